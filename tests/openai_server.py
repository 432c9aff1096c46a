"""A real local HTTP server that speaks the OpenAI chat-completions API, for tests.

It listens on 127.0.0.1 on an ephemeral port in a background thread; the code under test talks
to it through the real ``openai`` client (``base_url=server.base_url``), so HTTP, JSON, status
codes, headers and timeouts are all exercised for real. Nothing leaves the machine.

Replies are scripted per test, in order::

    with OpenAIServer() as server:
        server.push(reply_error(429, "slow down"), reply_json({"ok": True}))
        client = LLMClient(api_key="test", base_url=server.base_url, ...)
        ...
        assert len(server.requests) == 2

A reply is one of:

* ``reply_text(s)`` / ``reply_json(obj)``: a normal completion whose content is ``s`` /
  ``json.dumps(obj)``;
* ``reply_error(status, message, retry_after=None)``: an OpenAI-style error body;
* ``reply_slow(seconds, then)``: sleep (longer than the client's timeout to simulate one), then
  answer ``then``;
* ``reply_fn(fn)``: ``fn(request_body) -> reply`` decides from the request (e.g. echo the
  tokens a judge was shown).

When the script runs out the ``default`` reply is used (a 500 naming the missing script, unless
set), so a test that makes more calls than expected fails loudly. ``reject_response_format``
makes the server answer 400 to requests carrying ``response_format`` like older local servers.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class ScriptedReply:
    status: int = 200
    content: str | None = None
    error: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    fn: Callable[[dict[str, Any]], ScriptedReply] | None = None
    #: The first output token's alternatives {token: probability}, sent as logprobs.
    top_logprobs: dict[str, float] | None = None


def reply_text(text: str) -> ScriptedReply:
    return ScriptedReply(content=text)


def reply_json(obj: Any) -> ScriptedReply:
    return ScriptedReply(content=json.dumps(obj))


def reply_error(status: int, message: str, retry_after: float | None = None) -> ScriptedReply:
    headers = {} if retry_after is None else {"retry-after": str(retry_after)}
    return ScriptedReply(status=status, error=message, headers=headers)


def reply_slow(seconds: float, then: ScriptedReply) -> ScriptedReply:
    return ScriptedReply(
        status=then.status,
        content=then.content,
        error=then.error,
        headers=then.headers,
        delay=seconds,
        fn=then.fn,
    )


def reply_scores(probabilities: dict[str, float]) -> ScriptedReply:
    """A one-token reply whose top alternatives have these probabilities."""
    best = max(probabilities, key=probabilities.__getitem__)
    return ScriptedReply(content=best, top_logprobs=probabilities)


def reply_fn(fn: Callable[[dict[str, Any]], ScriptedReply]) -> ScriptedReply:
    return ScriptedReply(fn=fn)


class OpenAIServer:
    """The server; use as a context manager or call ``start()``/``stop()``."""

    def __init__(self, default: ScriptedReply | None = None, reject_response_format: bool = False):
        self.default = default
        self.reject_response_format = reject_response_format
        self.requests: list[dict[str, Any]] = []  # parsed JSON bodies, in arrival order
        self.headers: list[dict[str, str]] = []
        self._script: deque[ScriptedReply] = deque()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- scripting -------------------------------------------------------------------------------
    def push(self, *replies: ScriptedReply) -> None:
        with self._lock:
            self._script.extend(replies)

    @property
    def pending(self) -> int:
        """Scripted replies not consumed yet."""
        return len(self._script)

    def _next(self, body: dict[str, Any]) -> ScriptedReply:
        with self._lock:
            self.requests.append(body)
            if self._script:
                reply = self._script.popleft()
            elif self.default is not None:
                reply = self.default
            else:
                reply = reply_error(
                    500, f"test server: no scripted reply for request #{len(self.requests)}"
                )
        if reply.delay:
            time.sleep(reply.delay)
        if reply.fn is not None:
            reply = reply.fn(body)
        return reply

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> OpenAIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    self._send(400, {"error": {"message": "invalid JSON body"}})
                    return
                server.headers.append({k.lower(): v for k, v in self.headers.items()})
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                if server.reject_response_format and "response_format" in body:
                    with server._lock:
                        server.requests.append(body)
                    self._send(
                        400,
                        {
                            "error": {
                                "message": "response_format is not supported",
                                "type": "invalid_request_error",
                            }
                        },
                    )
                    return
                reply = server._next(body)
                if reply.error is not None or reply.status != 200:
                    self._send(
                        reply.status,
                        {"error": {"message": reply.error or "error", "type": "test_error"}},
                        reply.headers,
                    )
                    return
                payload = _completion(body.get("model", "test-model"), reply.content)
                if reply.top_logprobs is not None:
                    payload["choices"][0]["logprobs"] = {
                        "content": [
                            {
                                "token": reply.content,
                                "logprob": math.log(reply.top_logprobs[reply.content]),
                                "bytes": None,
                                "top_logprobs": [
                                    {"token": t, "logprob": math.log(p), "bytes": None}
                                    for t, p in reply.top_logprobs.items()
                                ],
                            }
                        ]
                    }
                self._send(200, payload)

            def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left; that is the point of slow replies

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _completion(model: str, content: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
