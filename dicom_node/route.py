"""Routing: (an instance's tags, the rules in conf.yaml) → (task, view), or None.

Pure functions. Modalities spell the same thing many ways, so body part and view are normalised
first: ``L-SPINE``, ``LUMBAR SPINE``, ``LSPINE`` → ``LSPINE``; ``LL``, ``RL``, ``LAT``,
``LATERAL`` → ``LAT``; ``AP``, ``PA`` → ``AP`` (a frontal view).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dicom_node.config import RoutingRule

__all__ = ["Route", "normalise_body_part", "normalise_view", "route"]

_BODY_PARTS = {
    "KNEE": "KNEE",
    "KNEEJOINT": "KNEE",
    "HIP": "HIP",
    "HIPJOINT": "HIP",
    "PELVIS": "PELVIS",
    "LSPINE": "LSPINE",
    "LUMBARSPINE": "LSPINE",
    "SPINELUMBAR": "LSPINE",
    "LUMBAR": "LSPINE",
    "LUMBOSACRAL": "LSPINE",
    "LSSPINE": "LSPINE",
}
_FRONTAL = {"AP", "PA", "APERECT", "APSUPINE", "FRONTAL"}
_LATERAL = {"LAT", "LL", "RL", "LATERAL", "LLAT", "RLAT", "XTABLE", "CROSSTABLE"}


def _squash(value: object) -> str:
    return re.sub(r"[^A-Z0-9]", "", str(value or "").upper())


def normalise_body_part(value: object) -> str | None:
    """BodyPartExamined as one of KNEE, HIP, PELVIS, LSPINE, or None when unknown."""
    return _BODY_PARTS.get(_squash(value))


def normalise_view(view_position: object, description: object = "") -> str | None:
    """``AP`` (frontal) or ``LAT``, from ViewPosition, else from the description's words."""
    squashed = _squash(view_position)
    if squashed in _FRONTAL:
        return "AP"
    if squashed in _LATERAL:
        return "LAT"
    words = set(re.split(r"[^A-Z]+", str(description or "").upper()))
    if words & {"LAT", "LATERAL", "LL", "RL"}:
        return "LAT"
    if words & {"AP", "PA", "FRONTAL"}:
        return "AP"
    return None


@dataclass(frozen=True)
class Route:
    task: str
    view: str
    laterality: str | None


def route(tags: Mapping[str, object], rules: Sequence[RoutingRule]) -> Route | None:
    """The first rule that matches ``tags`` (keywords → values), or None.

    ``tags`` needs Modality, BodyPartExamined, ViewPosition and optionally SeriesDescription,
    ProtocolName, ImageLaterality, Laterality.
    """
    modality = str(tags.get("Modality") or "").upper()
    body_part = normalise_body_part(tags.get("BodyPartExamined"))
    description = " ".join(
        str(tags.get(key) or "") for key in ("SeriesDescription", "ProtocolName")
    ).strip()
    view = normalise_view(tags.get("ViewPosition"), description)
    if view is None:
        return None
    for rule in rules:
        if rule.modality and modality not in {m.upper() for m in rule.modality}:
            continue
        wanted = {normalise_body_part(b) or b.upper() for b in rule.body_part}
        if body_part not in wanted:
            continue
        if rule.series_description and not re.search(
            rule.series_description, description, flags=re.IGNORECASE
        ):
            continue
        side = str(tags.get("ImageLaterality") or tags.get("Laterality") or "").upper()
        return Route(task=rule.task, view=view, laterality=side if side in ("R", "L") else None)
    return None
