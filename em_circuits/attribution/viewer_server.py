"""The local viewer server: circuit-tracer's frontend bound to localhost."""

from __future__ import annotations

import argparse
import errno
import functools
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
from urllib.parse import quote

from em_circuits.attribution.viewer_frontend import build_frontend
from em_circuits.attribution.viewer_http import (
    ThreadingViewerServer,
    ThreadingViewerServer6,
    ViewerRequestHandler,
    is_loopback,
)
from em_circuits.attribution.viewer_metadata import ViewerError, read_metadata, viewer_slug
from em_circuits.core.atomic import pid_alive

log = logging.getLogger(__name__)


DEFAULT_HOST = "127.0.0.1"


DEFAULT_PORT = 8041


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
        """The side-by-side page opened on one prompt (add ``&feature=<layer>:<feature>``
        to select a feature, ``&diff=1`` for the diff colours)."""
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
    check_port(port)
    viewer_dir = Path(viewer_dir).resolve()
    viewer_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_frontends()
    frontend_dir = Path(tempfile.mkdtemp(prefix=_frontend_prefix(os.getpid())))
    try:
        build_frontend(frontend_dir)
        handler = functools.partial(
            ViewerRequestHandler, frontend_dir=str(frontend_dir), data_dir=str(viewer_dir)
        )
        server_cls = ThreadingViewerServer6 if ":" in host else ThreadingViewerServer
        try:
            httpd = server_cls((host, port), handler)
        except OSError as err:  # only binding: a failed frontend copy is not a port problem
            raise ViewerError(bind_error_message(host, port, err)) from err
    except BaseException:
        shutil.rmtree(frontend_dir, ignore_errors=True)
        raise
    if not is_loopback(host):
        log.warning(
            "viewer listens on %r: anyone who can reach this machine can read and "
            "modify the graphs in %s",
            host or "all interfaces",
            viewer_dir,
        )
    # a short poll: stopping the viewer (Ctrl-C, a test's teardown) waits at most that long
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="em-viewer", daemon=True
    )
    thread.start()
    return ViewerServer(viewer_dir, httpd, thread, frontend_dir)


def check_port(port: int) -> None:
    """Raise ViewerError unless ``port`` is one a server can listen on (0: any free one)."""
    if not 0 <= int(port) <= 65535:
        raise ViewerError(
            f"--port {port} is not a port number: use one in 1-65535, or 0 for any free port"
        )


def bind_error_message(host: str, port: int, err: OSError) -> str:
    """What went wrong when listening on ``host:port`` and which flag fixes it."""
    default = f"servers bind to {DEFAULT_HOST} (this machine only) unless --host says otherwise"
    if isinstance(err, socket.gaierror):  # not an IP address, and no such host name
        return f"--host {host!r} is not a valid address or host name; {default}"
    if err.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is in use (another viewer?); pick another --port, "
            "or --port 0 for any free one"
        )
    if err.errno == errno.EADDRNOTAVAIL:
        return f"--host {host} is not an address of this machine; {default}"
    if err.errno == errno.EACCES:
        return f"port {port} needs administrator rights; pick a --port above 1023, or 0"
    return f"cannot listen on {host}:{port} ({err.strerror or err}); check --host and --port"


#: The frontend copy of a running viewer is named after its host and process, so that a
#: later viewer can remove the copies of viewers that were killed (kill -9 runs no cleanup).
_FRONTEND_PREFIX = "em-viewer-frontend-"


def _frontend_prefix(pid: int) -> str:
    return f"{_FRONTEND_PREFIX}{socket.gethostname().replace('-', '_')}-{pid}-"


def remove_stale_frontends(tmp_dir: Path | None = None) -> int:
    """Delete the frontend copies of this host's viewers whose process is gone; returns how
    many. A copy of a live viewer, or of another host sharing the folder, is kept."""
    root = Path(tmp_dir or tempfile.gettempdir())
    host = socket.gethostname().replace("-", "_")
    removed = 0
    for path in root.glob(f"{_FRONTEND_PREFIX}{host}-*"):
        pid_text = path.name[len(_FRONTEND_PREFIX) + len(host) + 1 :].split("-", 1)[0]
        if not pid_text.isdigit() or pid_alive(int(pid_text)) or not path.is_dir():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += not path.exists()
    return removed


def serve_forever(viewer_dir: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Serve ``viewer_dir`` until Ctrl-C; prints the page's URL."""
    # SIGTERM (kill, a job scheduler) unwinds like Ctrl-C, so the frontend copy is removed;
    # the handler is in place before the URL is printed, which is when callers may stop us.
    in_main = threading.current_thread() is threading.main_thread()  # signals need main
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main else None
    server = None
    try:
        server = start_viewer(viewer_dir, host, port)
        print(f"Graph viewer for {server.viewer_dir}: {server.url}  (Ctrl-C stops)", flush=True)
        print(full_graph_listing(server.viewer_dir), flush=True)
        if is_loopback(server.host):
            print(
                f"From another machine: ssh -L {server.port}:127.0.0.1:{server.port} <this host>",
                flush=True,
            )
        while server.thread.is_alive():
            server.thread.join(timeout=0.5)  # short waits keep Ctrl-C responsive
    except KeyboardInterrupt:
        print("\nstopping the viewer", flush=True)
    finally:
        if server is not None:
            server.stop()
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def full_graph_listing(viewer_dir: Path) -> str:
    """Which prompts have full graphs to show, and how to add one (the graph stage keeps
    feature-to-feature edges only for the prompts chosen with --full-graphs)."""
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
