"""Graph viewer: circuit-tracer's frontend, served offline, base and adapted graphs side by side.

* ``write_viewer_graph()`` writes one attribution graph in circuit-tracer's frontend format
  (``<slug>.json`` plus its entry in ``graph-metadata.json``) into a viewer directory.
* ``start_viewer()`` / ``serve_forever()`` serve that directory with circuit-tracer's request
  handler on 127.0.0.1 by default. ``/compare.html?prompt=<id>`` shows a prompt's base and adapted
  graphs side by side, with a selector over all prompts; ``/index.html?slug=<slug>`` is
  circuit-tracer's single-graph page.

circuit-tracer's frontend loads d3, its "jetpack" helpers, an npy loader, dagre and pako from
CDNs, which clusters without internet cannot reach. The viewer therefore serves a copy of the
frontend whose pages load local files instead: d3, dagre and pako vendored from npm under
``viewer_assets/vendor`` (see scripts/install_viewer_deps.sh) and small local shims for the rest.
site-packages is never modified.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import functools
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import socketserver
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

from circuit_tracer.frontend.local_server import CircuitGraphHandler, ReusableTCPServer

from em_circuits.store import atomic_write_text

if TYPE_CHECKING:
    from circuit_tracer import Graph

log = logging.getLogger(__name__)

ROLES = ("base", "adapted")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8041
METADATA_FILE = "graph-metadata.json"
ASSETS_DIR = Path(__file__).with_name("viewer_assets")
VENDOR_DIR = ASSETS_DIR / "vendor"
VENDOR_FILES = ("d3.min.js", "dagre.min.js", "pako_inflate.min.js")
INSTALL_HINT = "run scripts/install_viewer_deps.sh to restore the viewer's vendored JavaScript"

# CDN script of circuit-tracer's frontend (by file name) -> local file, or None to drop it.
SCRIPT_REPLACEMENTS: dict[str, str | None] = {
    "hotserver-client-ws.js": None,  # live reload while editing the frontend; not needed
    "d3.js": "./vendor/d3.min.js",
    "jetpack_2024-07-20.js": "./viewer/jetpack-shim.js",
    "npy_v0.js": "./viewer/npy-shim.js",
    "dagre.min.js": "./vendor/dagre.min.js",
    "pako.min.js": "./vendor/pako_inflate.min.js",
}
_EXTERNAL_SCRIPT = re.compile(r"""<script\s+src=(['"])(https?://[^'"]+)\1\s*>\s*</script>\n?""")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ViewerError(RuntimeError):
    """The viewer cannot write or serve graphs (bad name, missing assets, port in use)."""


# -- graph files --------------------------------------------------------------------------------
def viewer_slug(prompt_id: str, role: str) -> str:
    """Name of a prompt's graph in the viewer: ``<prompt_id>--<role>``."""
    if role not in ROLES:
        raise ViewerError(f"role must be one of {ROLES}, got {role!r}")
    # The slug becomes a file name and a URL path segment, so keep it to plain characters.
    if not _SAFE_ID.match(prompt_id):
        raise ViewerError(f"prompt id {prompt_id!r} must match {_SAFE_ID.pattern}")
    return f"{prompt_id}--{role}"


def write_viewer_graph(
    graph: Graph,
    viewer_dir: Path,
    prompt_id: str,
    role: str,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    scan: str | None = None,
) -> Path:
    """Write ``graph`` as the ``role`` graph of ``prompt_id``; returns the graph's JSON path.

    Uses circuit-tracer's ``create_graph_files`` (pruning with the given thresholds) in a
    scratch directory, then moves the graph file into place and upserts its metadata entry
    under a lock, so concurrent writers and a viewer reading meanwhile never see partial
    files. The caller's graph object is left untouched (circuit-tracer moves the graph it is
    given between devices). ``scan`` defaults to ``graph.scan`` (the transcoder set's name).
    The page opens with the graph's first logit target selected.
    """
    from circuit_tracer.utils.create_graph_files import create_graph_files

    slug = viewer_slug(prompt_id, role)
    viewer_dir = Path(viewer_dir)
    viewer_dir.mkdir(parents=True, exist_ok=True)
    scan = scan or _scan_name(graph)
    with tempfile.TemporaryDirectory(dir=viewer_dir, prefix=f".tmp-{slug}-") as scratch:
        # A shallow copy: create_graph_files reassigns the tensors it moves, on the copy only.
        create_graph_files(
            copy.copy(graph),
            slug,
            scratch,
            scan=scan,
            node_threshold=node_threshold,
            edge_threshold=edge_threshold,
        )
        entry = _metadata_entry(Path(scratch), slug)
        _preselect_first_target(Path(scratch) / f"{slug}.json")
        target = viewer_dir / f"{slug}.json"
        os.replace(Path(scratch) / f"{slug}.json", target)
    entry.update(prompt_id=prompt_id, role=role, title_prefix=f"[{role}]")
    upsert_metadata(viewer_dir, entry)
    return target


def _preselect_first_target(path: Path) -> None:
    """Open the graph with its first logit target clicked, its direct inputs highlighted.

    circuit-tracer's frontend means to do this itself but looks for a flag its graphs do not
    carry, so both panes would open with nothing selected. The pipeline's first target is the
    evil-vs-safe contrast, the node to compare across base and adapted.
    """
    data = json.loads(path.read_text())
    first = next((n for n in data["nodes"] if n.get("is_target_logit")), None)
    if first is None:
        return
    data["qParams"]["clickedId"] = first["node_id"]
    path.write_text(json.dumps(data))


def _scan_name(graph: Graph) -> str:
    scan = getattr(graph, "scan", None)
    if isinstance(scan, str) and scan:
        return scan
    if isinstance(scan, list) and scan:
        return "custom-" + "-".join(Path(p).stem for p in scan)[:80]
    return "local"


def _metadata_entry(scratch: Path, slug: str) -> dict[str, Any]:
    graphs = json.loads((scratch / METADATA_FILE).read_text())["graphs"]
    return next(g for g in graphs if g["slug"] == slug)


def upsert_metadata(viewer_dir: Path, entry: dict[str, Any]) -> None:
    """Insert or replace ``entry`` (by slug) in ``graph-metadata.json``, atomically.

    Entries are kept sorted by prompt and role so the frontend's default graph and selectors
    are stable across runs.
    """
    viewer_dir = Path(viewer_dir)
    with _locked(viewer_dir / f".{METADATA_FILE}.lock"):
        graphs = [g for g in read_metadata(viewer_dir) if g.get("slug") != entry["slug"]]
        graphs.append(entry)
        graphs.sort(key=_metadata_order)
        atomic_write_text(viewer_dir / METADATA_FILE, json.dumps({"graphs": graphs}, indent=1))


def read_metadata(viewer_dir: Path) -> list[dict[str, Any]]:
    """The entries of ``graph-metadata.json`` (empty if the directory has no graphs yet)."""
    path = Path(viewer_dir) / METADATA_FILE
    if not path.is_file():
        return []
    return json.loads(path.read_text())["graphs"]


def _metadata_order(entry: dict[str, Any]) -> tuple[str, int, str]:
    role = entry.get("role")
    return (entry.get("prompt_id", ""), ROLES.index(role) if role in ROLES else 9, entry["slug"])


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    # An advisory lock: several graph writers (processes) may share one viewer directory.
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- offline frontend ---------------------------------------------------------------------------
def build_frontend(dest: Path) -> list[str]:
    """Copy circuit-tracer's frontend into ``dest`` with local scripts instead of CDN ones.

    Adds the vendored libraries (``vendor/``), the shims and the side-by-side page
    (``viewer/``, ``compare.html``). Returns the CDN scripts it could not replace (a newer
    circuit-tracer may add some); they are left in place and logged.
    """
    missing = [name for name in VENDOR_FILES if not (VENDOR_DIR / name).is_file()]
    if missing:
        raise ViewerError(f"missing {', '.join(missing)} in {VENDOR_DIR}; {INSTALL_HINT}")
    dest = Path(dest)
    source = Path(str(files("circuit_tracer") / "frontend" / "assets"))
    shutil.copytree(source, dest, dirs_exist_ok=True)
    shutil.copytree(VENDOR_DIR, dest / "vendor", dirs_exist_ok=True)
    (dest / "viewer").mkdir(exist_ok=True)
    for script in ASSETS_DIR.glob("*.js"):
        shutil.copy2(script, dest / "viewer" / script.name)
    shutil.copy2(ASSETS_DIR / "compare.html", dest / "compare.html")
    unresolved: list[str] = []
    for page in dest.rglob("*.html"):
        text, left = localize_scripts(page.read_text(encoding="utf-8"))
        page.write_text(text, encoding="utf-8")
        unresolved += left
    for url in sorted(set(unresolved)):
        log.warning("viewer: no local copy of %s; that page needs internet access", url)
    return sorted(set(unresolved))


def localize_scripts(html: str) -> tuple[str, list[str]]:
    """Point a frontend page's CDN scripts at local files; returns (page, unreplaced URLs)."""
    unresolved: list[str] = []

    def replace(match: re.Match[str]) -> str:
        url = match.group(2)
        name = urlsplit(url).path.rsplit("/", 1)[-1]
        if name not in SCRIPT_REPLACEMENTS:
            unresolved.append(url)
            return match.group(0)
        local = SCRIPT_REPLACEMENTS[name]
        return "" if local is None else f"<script src='{local}'></script>\n"

    html = _EXTERNAL_SCRIPT.sub(replace, html)
    # The error recorder goes first so it also sees failures of the scripts after it.
    first = html.find("<script")
    if first >= 0 and "page-errors.js" not in html:
        recorder = "<script src='./viewer/page-errors.js'></script>\n"
        html = html[:first] + recorder + html[first:]
    return html, unresolved


# -- server -------------------------------------------------------------------------------------
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
        bound = self.server.server_address[0]
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
        httpd = server_cls((host, port), handler)
    except OSError as err:
        shutil.rmtree(frontend_dir, ignore_errors=True)
        raise ViewerError(f"cannot listen on {host}:{port} ({err}); pick another --port") from err
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
