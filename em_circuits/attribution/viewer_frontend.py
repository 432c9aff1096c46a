"""The viewer's offline copy of circuit-tracer's frontend.

circuit-tracer's frontend loads d3, its "jetpack" helpers, an npy loader, dagre and pako from
CDNs, which clusters without internet cannot reach; :func:`build_frontend` copies it with
local files instead (d3, dagre and pako vendored from npm under ``viewer_assets/vendor``, see
scripts/install_viewer_deps.sh, and small local shims for the rest), adds this project's
pages and scripts, and escapes the text the frontend would otherwise write as HTML.
site-packages is never modified.
"""

from __future__ import annotations

import logging
import re
import shutil
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlsplit

from em_circuits.attribution.viewer_metadata import ViewerError

log = logging.getLogger(__name__)


ASSETS_DIR = Path(__file__).with_name("viewer_assets")


VENDOR_DIR = ASSETS_DIR / "vendor"


VENDOR_FILES = ("d3.min.js", "dagre.min.js", "pako_inflate.min.js")


INSTALL_HINT = "run scripts/install_viewer_deps.sh to restore the viewer's vendored JavaScript"


SCRIPT_REPLACEMENTS: dict[str, str | None] = {
    "hotserver-client-ws.js": None,  # live reload while editing the frontend; not needed
    "d3.js": "./vendor/d3.min.js",
    "jetpack_2024-07-20.js": "./viewer/jetpack-shim.js",
    "npy_v0.js": "./viewer/npy-shim.js",
    "dagre.min.js": "./vendor/dagre.min.js",
    "pako.min.js": "./vendor/pako_inflate.min.js",
}


_EXTERNAL_SCRIPT = re.compile(r"""<script\s+src=(['"])(https?://[^'"]+)\1\s*>\s*</script>\n?""")


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
    for asset in (*ASSETS_DIR.glob("*.js"), *ASSETS_DIR.glob("*.css")):
        shutil.copy2(asset, dest / "viewer" / asset.name)
    shutil.copy2(ASSETS_DIR / "compare.html", dest / "compare.html")
    escape_untrusted_text(dest)
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
    if "naming.css" not in html:
        html = html.replace(
            "</title>", "</title>\n<link rel='stylesheet' href='./viewer/naming.css'>", 1
        )
    # The error recorder goes first so it also sees failures of the scripts after it; the
    # escaping helper and the layout hook must exist before the frontend's scripts run.
    first = html.find("<script")
    if first >= 0 and "page-errors.js" not in html:
        early = ["page-errors.js", "safe-html.js"]
        if "init-gridsnap.js" in html:  # a graph page: lay out for its width
            early.append("frame-layout.js")
        tags = "".join(f"<script src='./viewer/{name}'></script>\n" for name in early)
        html = html[:first] + tags + html[first:]
    return html, unresolved


#: Where circuit-tracer 0.5's frontend writes text from the graph files (node names, which
#: carry prompt tokens, feature labels and target names) or from the URL with innerHTML;
#: each is rewritten to escape that text first (``emEscapeHtml`` from safe-html.js), so that
#: markup in a prompt or a label shows as text and never runs. {file: [(old, new, count)]}.
HTML_SINK_PATCHES: dict[str, list[tuple[str, str, int]]] = {
    "attribution_graph/util-cg.js": [
        (
            "!ev.metaKey ? (d.ppClerp || `F#${d.feature}`) :",
            "!ev.metaKey ? emEscapeHtml(d.ppClerp || `F#${d.feature}`) :",
            1,
        ),
        ("!ev.metaKey ? d.ppClerp :", "!ev.metaKey ? emEscapeHtml(d.ppClerp) :", 1),
        (
            "return `<div>${str}: <b>${val}</b></div>`",
            "return `<div>${emEscapeHtml(str)}: <b>${emEscapeHtml(val)}</b></div>`",
            2,
        ),
        (
            "<code>${urlStr}</code>: ${exc}.",
            "<code>${emEscapeHtml(urlStr)}</code>: ${emEscapeHtml(exc)}.",
            1,
        ),
    ],
    "attribution_graph/init-cg-feature-detail.js": [
        ('href="${d.url}"', 'href="${emEscapeHtml(d.url)}"', 1),
    ],
}


def escape_untrusted_text(dest: Path) -> None:
    """Apply :data:`HTML_SINK_PATCHES` to the frontend copy in ``dest``.

    Raises ViewerError when a sink is not found as expected (another circuit-tracer
    version): serving a page that may run a prompt's markup is worse than not serving.
    """
    for name, replacements in HTML_SINK_PATCHES.items():
        path = Path(dest) / name
        text = path.read_text(encoding="utf-8")
        for old, new, count in replacements:
            if text.count(old) != count:
                raise ViewerError(
                    f"circuit-tracer's {name} changed: expected {count} of {old!r}; the viewer "
                    "cannot escape node names there (update HTML_SINK_PATCHES in "
                    "em_circuits/attribution/viewer_frontend.py)"
                )
            text = text.replace(old, new)
        path.write_text(text, encoding="utf-8")
