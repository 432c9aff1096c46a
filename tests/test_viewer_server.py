"""`em-circuits serve` as users run it: one-line errors for bad flags, quiet about clients that
leave early, proper answers to odd requests, and no frontend copies left by killed viewers.

Each test starts the real command in a subprocess on 127.0.0.1 with a real viewer directory.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
URL_LINE = re.compile(r"http://127\.0\.0\.1:(\d+)/compare\.html")


def _viewer_dir(tmp_path: Path) -> Path:
    """A viewer directory with one graph file, as the graph stage leaves it (content is
    beside the point for these tests)."""
    viewer = tmp_path / "viewer"
    viewer.mkdir()
    graph = {"metadata": {"slug": "p1--base"}, "qParams": {}, "nodes": [], "links": []}
    (viewer / "p1--base.json").write_text(json.dumps(graph))
    entry = {"slug": "p1--base", "prompt_id": "p1", "role": "base", "prompt": "hi"}
    (viewer / "graph-metadata.json").write_text(json.dumps({"graphs": [entry]}))
    return viewer


def _serve_command(tmp_path: Path, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "em_circuits.cli.main",
        "serve",
        "--results-dir",
        str(tmp_path / "results"),
        "--viewer-dir",
        str(tmp_path / "viewer"),
        *flags,
    ]


def _env(tmp_path: Path) -> dict[str, str]:
    # Frontend copies go to a temporary folder of this test, not the machine's /tmp.
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}


class Serve:
    """A running `em-circuits serve --port 0`; its stderr goes to a file read after stop()."""

    def __init__(self, tmp_path: Path, name: str = "serve") -> None:
        self.stderr_path = tmp_path / f"{name}.stderr"
        self._stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen(
            _serve_command(tmp_path, "--port", "0"),
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=_env(tmp_path),
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()  # the page's URL, once listening
        found = URL_LINE.search(first)
        assert found, f"no URL in {first!r}; stderr: {self.stderr_path.read_text()[-2000:]}"
        self.port = int(found.group(1))

    def request(self, method: str, path: str, **kwargs: object) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        conn.request(method, path, **kwargs)  # type: ignore[arg-type]
        response = conn.getresponse()
        response.read()
        conn.close()
        return response

    def stop(self) -> str:
        """SIGTERM (a clean stop); returns everything the server wrote to stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self._stderr.close()
        return self.stderr_path.read_text()


@pytest.fixture()
def serve(tmp_path):
    _viewer_dir(tmp_path)
    running = Serve(tmp_path)
    yield running
    running.stop()


# -- item: bad flags give one line --------------------------------------------------------------
def _one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    return lines[0]


def _run_serve(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _serve_command(tmp_path, *flags),
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=120,
    )


def test_serve_on_a_busy_port_says_pick_another_port(tmp_path):
    _viewer_dir(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _one_error_line(_run_serve(tmp_path, "--port", str(port)))
    assert f"port {port}" in line and "in use" in line and "another --port" in line


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_serve_with_an_invalid_port_names_the_valid_range(tmp_path, port):
    _viewer_dir(tmp_path)
    line = _one_error_line(_run_serve(tmp_path, "--port", port))
    assert f"--port {port}" in line and "1-65535" in line and "0 for any free port" in line
    assert "another --port" not in line


def test_serve_with_a_bad_host_says_what_is_wrong_with_it(tmp_path):
    _viewer_dir(tmp_path)
    line = _one_error_line(_run_serve(tmp_path, "--host", "256.1.1.1", "--port", "0"))
    assert "--host '256.1.1.1' is not a valid address" in line
    assert "bind to 127.0.0.1" in line and "--port" not in line
    # A valid address that no interface of this machine has (TEST-NET-3, RFC 5737).
    line = _one_error_line(_run_serve(tmp_path, "--host", "203.0.113.7", "--port", "0"))
    assert "--host 203.0.113.7 is not an address of this machine" in line
    assert "bind to 127.0.0.1" in line


# -- item: quiet about clients that leave, odd paths answered -----------------------------------
def test_clients_that_disconnect_early_print_no_traceback(serve, tmp_path):
    # 40 MB of hex (20 MB gzip-compressed): far more than the socket buffers hold, so the
    # server is still writing when the client resets the connection.
    (tmp_path / "viewer" / "big.json").write_text(os.urandom(20 * 1024 * 1024).hex())
    for _ in range(3):
        client = socket.create_connection(("127.0.0.1", serve.port), timeout=20)
        client.sendall(b"GET /graph_data/big.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert client.recv(64).startswith(b"HTTP/1.0 200")  # the server is writing
        # Close with RST (linger 0), as a browser tab being closed can.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
    for path in ("/compare.html", "/data/graph-metadata.json"):
        assert serve.request("GET", path).status == 200  # still serving
    stderr = serve.stop()
    assert "Traceback" not in stderr and "Exception" not in stderr, stderr[-3000:]


@pytest.mark.parametrize(
    "path",
    ["/index.html%00", "/%00", "/data/graph-metadata.json%00.txt", "/graph_data/%00x", "/%ff"],
)
def test_odd_request_paths_get_an_error_status_not_a_traceback(serve, path):
    for method in ("GET", "HEAD"):
        assert serve.request(method, path).status in (400, 404), (method, path)
    assert serve.request("GET", "/compare.html").status == 200
    stderr = serve.stop()
    assert "Traceback" not in stderr, stderr[-3000:]


# -- item: HEAD, POST and save ------------------------------------------------------------------
def test_head_requests_get_the_host_check(serve):
    for method in ("GET", "HEAD"):
        assert serve.request(method, "/compare.html").status == 200
        rebinding = serve.request(method, "/compare.html", headers={"Host": "attacker.example"})
        assert rebinding.status == 403, method
        data = serve.request(method, "/data/graph-metadata.json", headers={"Host": "evil.test"})
        assert data.status == 403, method


def test_post_to_an_unknown_path_gets_404(serve):
    response = serve.request("POST", "/no/such/endpoint", body=b"{}")
    assert response.status == 404


def test_save_graph_refuses_a_huge_body_at_once_and_saves_a_small_one(serve, tmp_path):
    client = socket.create_connection(("127.0.0.1", serve.port), timeout=20)
    client.sendall(
        b"POST /save_graph/p1--base HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n"
    )
    # Answered without a byte of the body sent (the old handler read it forever).
    status_line = client.makefile("rb").readline()
    client.close()
    assert status_line.split()[1] == b"413", status_line
    body = json.dumps({"qParams": {"clickedId": "27_0_1"}}).encode()
    headers = {"Content-Type": "application/json"}
    assert serve.request("POST", "/save_graph/p1--base", body=body, headers=headers).status == 200
    saved = json.loads((tmp_path / "viewer" / "p1--base.json").read_text())
    assert saved["qParams"] == {"clickedId": "27_0_1"}
    for slug in ("no-such-graph", "..", "graph-metadata"):
        response = serve.request("POST", f"/save_graph/{slug}", body=body, headers=headers)
        assert response.status == 404, slug
    assert serve.request("POST", "/save_graph/p1--base", body=b"[1", headers=headers).status == 400


# -- item: frontend copies of killed viewers ----------------------------------------------------
def _frontend_copies(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "tmp").glob("em-viewer-frontend-*"))


def test_a_later_serve_removes_the_frontend_copy_of_a_killed_one(tmp_path):
    _viewer_dir(tmp_path)
    killed = Serve(tmp_path, "killed")
    (copy,) = _frontend_copies(tmp_path)
    assert (copy / "compare.html").is_file()
    os.kill(killed.proc.pid, signal.SIGKILL)  # no cleanup runs
    killed.proc.wait(timeout=30)
    killed.stop()
    assert copy.is_dir()
    live = Serve(tmp_path, "live")
    try:
        copies = _frontend_copies(tmp_path)
        assert copy not in copies and len(copies) == 1  # the live viewer's own copy stays
        # A third viewer keeps the copy of the live one.
        third = Serve(tmp_path, "third")
        assert set(copies) < set(_frontend_copies(tmp_path))
        third.stop()
    finally:
        live.stop()
    assert _frontend_copies(tmp_path) == []  # SIGTERM: each removed its own copy on exit
