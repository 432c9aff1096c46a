"""The local viewer server: circuit-tracer's frontend bound to localhost."""

from __future__ import annotations

import argparse
import functools
import ipaddress
import logging
import os
import shutil
import signal
import socket
import socketserver
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from circuit_tracer.frontend.local_server import CircuitGraphHandler, ReusableTCPServer

from em_circuits.attribution.viewer import ViewerError, build_frontend, viewer_slug

log = logging.getLogger(__name__)


DEFAULT_HOST = "127.0.0.1"


DEFAULT_PORT = 8041


class ViewerRequestHandler(CircuitGraphHandler):
    """circuit-tracer's handler with three guards it lacks.

    * /data/ and /graph_data/ paths may not leave the data directory (``..``);
    * on a loopback address, requests must name a loopback host, so a web page cannot reach the
      viewer through DNS rebinding;
    * the frontend's "save" POST must come from the viewer's own pages (no cross-site writes).
    Graph data is sent with ``Cache-Control: no-store`` because the frontend fetches it with
    ``force-cache`` and a rewritten graph would otherwise show stale.
    """

    def do_GET(self) -> None:
        if not self._host_allowed():
            self.send_error(403, "unexpected Host header")
            return
        if self._is_data_path() and not self._inside_data_dir():
            self.send_error(404)
            return
        super().do_GET()

    def do_POST(self) -> None:
        origin = self.headers.get("Origin")
        if not self._host_allowed() or (origin and urlsplit(origin).netloc != self.headers["Host"]):
            self.send_error(403, "cross-origin request")
            return
        super().do_POST()

    def end_headers(self) -> None:
        if self._is_data_path():
            self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def _is_data_path(self) -> bool:
        return self.path.startswith(("/data/", "/graph_data/"))

    def _inside_data_dir(self) -> bool:
        rel = self.path.split("?", 1)[0].split("/", 2)[2]
        root = os.path.realpath(self.data_dir)
        # The parent handler joins the raw path; check both raw and percent-decoded forms.
        return all(
            os.path.realpath(os.path.join(root, candidate)).startswith(root + os.sep)
            for candidate in (rel, unquote(rel))
        )

    def _host_allowed(self) -> bool:
        address = self.server.server_address
        if not isinstance(address, tuple):  # (host, port[, flow, scope]) for TCP servers
            raise TypeError(f"the viewer serves over TCP, not at {address!r}")
        bound = address[0]
        if not _is_loopback(bound):
            return True
        host = urlsplit("//" + self.headers.get("Host", "")).hostname or ""
        return host == "localhost" or _is_loopback(host)


class _ThreadingServer(socketserver.ThreadingMixIn, ReusableTCPServer):
    # Threads, so the two panes' many requests do not queue behind each other.
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass
class ViewerServer:
    """A running viewer; ``stop()`` (or leaving a ``with`` block) shuts it down."""

    viewer_dir: Path
    httpd: socketserver.TCPServer
    thread: threading.Thread
    frontend_dir: Path
    _stopped: bool = field(default=False, repr=False)

    @property
    def host(self) -> str:
        return str(self.httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def base_url(self) -> str:
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            host = socket.gethostname()  # all interfaces: any name of this machine works
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The side-by-side page (its selector lists every prompt)."""
        return f"{self.base_url}/compare.html"

    def compare_url(self, prompt_id: str) -> str:
        return f"{self.url}?prompt={quote(prompt_id)}"

    def graph_url(self, prompt_id: str, role: str) -> str:
        """circuit-tracer's single-graph page for one graph."""
        return f"{self.base_url}/index.html?slug={quote(viewer_slug(prompt_id, role))}"

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
        shutil.rmtree(self.frontend_dir, ignore_errors=True)

    def __enter__(self) -> ViewerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_viewer(
    viewer_dir: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> ViewerServer:
    """Serve ``viewer_dir`` in a background thread; ``port=0`` picks a free port.

    Binds 127.0.0.1 unless told otherwise: the graphs are research data and the frontend can
    write to them. From another machine, forward the port (``ssh -L 8041:127.0.0.1:8041``).
    """
    viewer_dir = Path(viewer_dir).resolve()
    viewer_dir.mkdir(parents=True, exist_ok=True)
    if not _is_loopback(host):
        log.warning(
            "viewer listens on %r: anyone who can reach this machine can read and "
            "modify the graphs in %s",
            host or "all interfaces",
            viewer_dir,
        )
    frontend_dir = Path(tempfile.mkdtemp(prefix="em-viewer-frontend-"))
    try:
        build_frontend(frontend_dir)
        handler = functools.partial(
            ViewerRequestHandler, frontend_dir=str(frontend_dir), data_dir=str(viewer_dir)
        )
        server_cls = _ThreadingServer6 if ":" in host else _ThreadingServer
        try:
            httpd = server_cls((host, port), handler)
        except OSError as err:  # only binding: a failed frontend copy is not a port problem
            raise ViewerError(
                f"cannot listen on {host}:{port} ({err}); pick another --port"
            ) from err
    except BaseException:
        shutil.rmtree(frontend_dir, ignore_errors=True)
        raise
    thread = threading.Thread(target=httpd.serve_forever, name="em-viewer", daemon=True)
    thread.start()
    return ViewerServer(viewer_dir, httpd, thread, frontend_dir)


def serve_forever(viewer_dir: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Serve ``viewer_dir`` until Ctrl-C; prints the page's URL."""
    server = start_viewer(viewer_dir, host, port)
    print(f"Graph viewer for {server.viewer_dir}: {server.url}  (Ctrl-C stops)", flush=True)
    print(full_graph_listing(server.viewer_dir), flush=True)
    if _is_loopback(server.host):
        print(
            f"From another machine: ssh -L {server.port}:127.0.0.1:{server.port} <this host>",
            flush=True,
        )
    # SIGTERM (kill, a job scheduler) unwinds like Ctrl-C, so the frontend copy is removed.
    in_main = threading.current_thread() is threading.main_thread()  # signals need main
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main else None
    try:
        while server.thread.is_alive():
            server.thread.join(timeout=0.5)  # short waits keep Ctrl-C responsive
    except KeyboardInterrupt:
        print("\nstopping the viewer", flush=True)
    finally:
        server.stop()
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def full_graph_listing(viewer_dir: Path) -> str:
    """Which prompts have full graphs to show, and how to add one (the graph stage keeps
    feature-to-feature edges only for the prompts chosen with --full-graphs)."""
    from em_circuits.attribution.viewer import read_metadata

    roles: dict[str, set[str]] = {}
    for entry in read_metadata(viewer_dir):
        roles.setdefault(str(entry.get("prompt_id")), set()).add(str(entry.get("role")))
    listed = ", ".join(f"{pid} ({'+'.join(sorted(r))})" for pid, r in sorted(roles.items()))
    return (
        f"Full graphs of {len(roles)} prompt(s): {listed or 'none'}. Add one with "
        "`em-circuits graphs --full-graphs PROMPT_ID`."
    )


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Serve attribution graphs written by write_viewer_graph (base vs adapted)."
    )
    parser.add_argument("viewer_dir", type=Path, help="directory holding graph-metadata.json")
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to bind (default: %(default)s; 0.0.0.0 exposes the graphs to the network)",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        serve_forever(args.viewer_dir, args.host, args.port)
    except ViewerError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
