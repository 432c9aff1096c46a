"""The one name of each kind of node: features, adapter components, viewer node ids."""

from __future__ import annotations

from urllib.parse import urlencode


def feature_name(layer: int, feature: int) -> str:
    """The one name of a transcoder feature in tables, cards and plots: ``L3 #1234``."""
    return f"L{int(layer)} #{int(feature)}"


#: Where `em-circuits serve` listens by default; report links point there.
DEFAULT_VIEWER_URL = "http://127.0.0.1:8041"


def viewer_link(
    prompt_id: str | None = None,
    feature: tuple[int, int] | None = None,
    diff: bool = False,
    base_url: str = DEFAULT_VIEWER_URL,
) -> str:
    """A deep link into the side-by-side page: a prompt, a feature (layer, id) selected in both
    panes, and the base-vs-adapted diff colouring. ``compare.html`` reads the same parameters."""
    query = []
    if prompt_id is not None:
        query.append(("prompt", prompt_id))
    if feature is not None:
        query.append(("feature", f"{int(feature[0])}:{int(feature[1])}"))
    if diff:
        query.append(("diff", "1"))
    suffix = ("?" + urlencode(query)) if query else ""
    return f"{base_url.rstrip('/')}/compare.html{suffix}"
