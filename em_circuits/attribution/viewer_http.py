"""The viewer's HTTP request handler: circuit-tracer's frontend and graph data, guarded.

circuit-tracer's own handler (``CircuitGraphHandler``) serves the data directory and saves a
graph's view state; this one replaces its GET, HEAD and POST handling so that every request
gets a proper response (no traceback per client, no thread stuck reading a body).
"""

from __future__ import annotations

import gzip
import ipaddress
import json
import logging
import os
import re
import socket
import socketserver
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

from circuit_tracer.frontend.local_server import CircuitGraphHandler, ReusableTCPServer

from em_circuits.attribution.viewer_metadata import read_metadata
from em_circuits.core.atomic import atomic_write_text

log = logging.getLogger(__name__)


#: Largest body of a "save" POST: the frontend sends its view state (pins, supernodes,
#: node names), kilobytes in practice.
MAX_SAVE_BYTES = 8 * 1024 * 1024


#: Seconds a connection may stall while a request or its body is read; a stalled client
#: then loses its connection instead of holding a thread.
REQUEST_TIMEOUT_S = 30


#: Data files larger than this are sent gzip-compressed (as circuit-tracer's handler does).
COMPRESSION_THRESHOLD_BYTES = 1024**2


_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ViewerRequestHandler(CircuitGraphHandler):
    """circuit-tracer's handler with the guards it lacks.

    * /data/ and /graph_data/ paths may not leave the data directory (``..``), and a path with
      a NUL byte is refused (400);
    * on a loopback address, GET, HEAD and POST must name a loopback host, so a web page
      cannot reach the viewer through DNS rebinding;
    * the frontend's "save" POST must come from the viewer's own pages (no cross-site writes),
      name an existing graph, and carry at most :data:`MAX_SAVE_BYTES` (413 before reading);
    * a client that disconnects early is not an error (no traceback).
    Graph data is sent with ``Cache-Control: no-store`` because the frontend fetches it with
    ``force-cache`` and a rewritten graph would otherwise show stale.
    """

    timeout = REQUEST_TIMEOUT_S  # socket timeout for every read and write of a connection

    def do_GET(self) -> None:
        if self._refused():
            return
        if self._is_data_path():
            self._send_data(with_body=True)
            return
        # Static frontend files; SimpleHTTPRequestHandler answers 404 for what is missing.
        super(CircuitGraphHandler, self).do_GET()

    def do_HEAD(self) -> None:
        if self._refused():
            return
        if self._is_data_path():
            self._send_data(with_body=False)
            return
        super().do_HEAD()

    def do_POST(self) -> None:
        origin = self.headers.get("Origin")
        if not self._host_allowed() or (origin and urlsplit(origin).netloc != self.headers["Host"]):
            self.send_error(403, "cross-origin request")
            return
        path = self.path.split("?", 1)[0]
        if not path.startswith("/save_graph/"):
            self.send_error(404, "no such endpoint")
            return
        self._save_graph(path[len("/save_graph/") :].strip("/"))

    def end_headers(self) -> None:
        if self._is_data_path():
            self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def _refused(self) -> bool:
        """Answers a request that may not be served (bad Host, NUL byte, path leaving the
        data directory); True when it did."""
        if not self._host_allowed():
            self.send_error(403, "unexpected Host header")
        elif (problem := _path_problem(self.path)) is not None:
            self.send_error(400, problem)
        elif self._is_data_path() and not self._inside_data_dir():
            self.send_error(404)
        else:
            return False
        return True

    def _is_data_path(self) -> bool:
        return self.path.startswith(("/data/", "/graph_data/"))

    def _data_file(self) -> str:
        rel = unquote(self.path.split("?", 1)[0].split("/", 2)[2])
        return os.path.join(self.data_dir, rel)

    def _inside_data_dir(self) -> bool:
        rel = self.path.split("?", 1)[0].split("/", 2)[2]
        root = os.path.realpath(self.data_dir)
        # Check both raw and percent-decoded forms.
        return all(
            os.path.realpath(os.path.join(root, candidate)).startswith(root + os.sep)
            for candidate in (rel, unquote(rel))
        )

    def _send_data(self, with_body: bool) -> None:
        path = self._data_file()
        try:
            with open(path, "rb") as handle:
                content = handle.read()
        except OSError:  # missing, a directory, unreadable
            self.send_error(404)
            return
        self.send_response(200)
        if len(content) > COMPRESSION_THRESHOLD_BYTES:
            content = gzip.compress(content, compresslevel=3)
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if with_body:
            self.wfile.write(content)

    def _save_graph(self, slug: str) -> None:
        """Store the frontend's view state (``qParams``) into graph ``slug``'s file."""
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.isdigit():
            self.send_error(411, "Content-Length required")
            return
        if int(length_text) > MAX_SAVE_BYTES:
            self.close_connection = True  # the body is never read
            self.send_error(413, f"body over {MAX_SAVE_BYTES} bytes")
            return
        body = self.rfile.read(int(length_text))  # bounded, and times out with the socket
        target = os.path.join(self.data_dir, f"{slug}.json")
        listed = {entry.get("slug") for entry in read_metadata(Path(self.data_dir))}
        if not _SLUG.match(slug) or slug not in listed or not os.path.isfile(target):
            self.send_error(404, "no such graph")
            return
        try:
            state = json.loads(body.decode("utf-8"))["qParams"]
            if not isinstance(state, dict):
                raise TypeError("qParams is not an object")
        except (ValueError, KeyError, TypeError) as err:
            self.send_error(400, f"expected JSON with a qParams object ({err})")
            return
        with open(target, encoding="utf-8") as handle:
            graph = json.load(handle)
        graph["qParams"] = state
        atomic_write_text(Path(target), json.dumps(graph))  # a reader never sees half a graph
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _host_allowed(self) -> bool:
        address = self.server.server_address
        if not isinstance(address, tuple):  # (host, port[, flow, scope]) for TCP servers
            raise TypeError(f"the viewer serves over TCP, not at {address!r}")
        bound = address[0]
        if not is_loopback(bound):
            return True
        host = urlsplit("//" + self.headers.get("Host", "")).hostname or ""
        return host == "localhost" or is_loopback(host)


class ThreadingViewerServer(socketserver.ThreadingMixIn, ReusableTCPServer):
    # Threads, so the two panes' many requests do not queue behind each other.
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A browser closing a connection mid-response (a reload, a closed tab) is normal.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


class ThreadingViewerServer6(ThreadingViewerServer):
    address_family = socket.AF_INET6


def _path_problem(path: str) -> str | None:
    """Why a request path cannot name a file (None when it can): the file functions raise
    ValueError, not OSError, on NUL bytes and on bytes that are not UTF-8."""
    try:
        decoded = unquote(path, errors="strict")
        os.fsencode(decoded)
    except ValueError:  # UnicodeError is one
        return "path is not valid UTF-8"
    return "NUL byte in path" if "\x00" in decoded else None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
