"""The feature files an exported graph's nodes name, read from the viewer folder and checked
against circuit-tracer's frontend feature format (also Neuronpedia's feature-details
format)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from em_circuits.attribution.export_json import (
    ExportError,
    dumps_json,
    first_error,
    read_json,
)
from em_circuits.attribution.viewer_metadata import FEATURE_NODE


def feature_files(
    viewer_dir: Path, scan: str, role: str, nodes: list[dict[str, Any]]
) -> dict[int, str]:
    """The feature files of the graph's feature nodes that the viewer folder holds, as the
    texts to write, by index."""
    from circuit_tracer.frontend.feature_models import Model as FeatureModel

    # The frontend fetches "<scan>/<feature>.json" for a local scan, where ./data/ is the
    # viewer folder; without one, the feature files sit in the layout the graph stage uses.
    if scan.startswith("./data/"):
        folder = (viewer_dir / scan[len("./data/") :]).resolve()
        if not folder.is_relative_to(viewer_dir):
            raise ExportError(f"graph scan {scan!r} points outside {viewer_dir}")
    else:
        folder = viewer_dir / "features" / role
    if not folder.is_dir():
        return {}
    layers = {int(n["feature"]): n["layer"] for n in nodes if n["feature_type"] == FEATURE_NODE}
    out: dict[int, str] = {}
    for index, layer in layers.items():
        path = folder / f"{index}.json"
        if not path.is_file():
            continue
        data = read_json(path)
        try:
            FeatureModel.model_validate(data)
        except ValidationError as err:
            raise ExportError(
                f"{path}: not a valid circuit-tracer feature: {first_error(err)}"
            ) from err
        if "layer" not in data and str(layer).isdigit():
            # Neuronpedia's feature format recommends the layer, to show it; the frontend
            # format carries only the (layer, feature) pairing index.
            data = {**data, "layer": int(str(layer))}
        out[index] = dumps_json(data, path)
    return out
