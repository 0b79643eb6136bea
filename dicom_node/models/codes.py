"""Codes the SR uses whatever the task, and the default classes of the built-in tasks.

Each task's classes and their codes are part of its spec (:mod:`dicom_node.tasks`, data in
``dicom_node/tasks.yaml``); a bundle's card carries the classes it was trained with. Implant
models and screw brands have no standard codes: they use the private coding scheme
``99ORTHONODE`` (declared in the SR's Coding Scheme Identification Sequence). Hip loosening
uses SNOMED CT: present / absent (undetermined when the model abstains).
"""

from __future__ import annotations

from dicom_node.domain import ClassInfo
from dicom_node.tasks import builtin_task

__all__ = ["PRIVATE_SCHEME", "UNDETERMINED", "card_classes", "classes_for"]

PRIVATE_SCHEME = "99ORTHONODE"
UNDETERMINED = ("373068000", "SCT", "Undetermined")


def classes_for(task: str) -> tuple[ClassInfo, ...]:
    """The default classes of a built-in ``task`` (a bundle's card may carry its own)."""
    return builtin_task(task).class_infos()


def card_classes(task: str) -> list[dict[str, str]]:
    """The default classes of a built-in ``task`` as card.json lists them (docs/bundles.md)."""
    return builtin_task(task).card_classes()
