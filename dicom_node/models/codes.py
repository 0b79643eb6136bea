"""The classes of each task and the codes that represent them in the SR.

Implant models and screw brands have no standard codes: they use the private coding scheme
``99ORTHONODE`` (declared in the SR's Coding Scheme Identification Sequence). CodeValue ≤ 16
characters, CodeMeaning ≤ 64 and readable, since viewers show the meaning. Hip loosening uses
SNOMED CT: present / absent (undetermined when the model abstains).
"""

from __future__ import annotations

from dicom_node.domain import ClassInfo

__all__ = ["PRIVATE_SCHEME", "TASK_CLASSES", "UNDETERMINED", "card_classes", "classes_for"]

PRIVATE_SCHEME = "99ORTHONODE"
UNDETERMINED = ("373068000", "SCT", "Undetermined")

_PRIVATE = {
    "knee": [
        ("KNEE-OPTETRAK", "Exactech Optetrak Logic"),
        ("KNEE-MAXX-FREE", "Maxx Freedom Knee"),
        ("KNEE-SN-LEGION", "Smith & Nephew Legion"),
        ("KNEE-STRYK-NRG", "Stryker NRG"),
        ("KNEE-ZIM-LPS", "Zimmer LPS"),
        ("KNEE-ZIM-PERSONA", "Zimmer Persona"),
    ],
    "spine": [
        ("SCREW-ASPINE-EVO", "A-Spine EVO"),
        ("SCREW-ARMSTRONG", "Armstrong"),
        ("SCREW-CDH", "CDH"),
        ("SCREW-EXPEDIUM", "Expedium"),
        ("SCREW-GEZEN", "Gezen"),
        ("SCREW-NOVA", "NOVA"),
        ("SCREW-XIA3", "Xia 3"),
    ],
}

#: Display names as the phantom generator and the studies name them, in model output order.
TASK_CLASSES: dict[str, tuple[ClassInfo, ...]] = {
    task: tuple(
        ClassInfo(
            index=i, name=name, code_value=code, coding_scheme=PRIVATE_SCHEME, code_meaning=name
        )
        for i, (code, name) in enumerate(entries)
    )
    for task, entries in _PRIVATE.items()
}
TASK_CLASSES["hip"] = (
    ClassInfo(
        index=0,
        name="well-fixed",
        code_value="272519000",
        coding_scheme="SCT",
        code_meaning="Absent",
    ),
    ClassInfo(
        index=1, name="loose", code_value="52101004", coding_scheme="SCT", code_meaning="Present"
    ),
)


def classes_for(task: str) -> tuple[ClassInfo, ...]:
    """The default classes of ``task`` (a bundle's card may carry its own)."""
    try:
        return TASK_CLASSES[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; tasks are {sorted(TASK_CLASSES)}") from None


def card_classes(task: str) -> list[dict[str, str]]:
    """The task's classes as card.json lists them (see docs/bundles.md)."""
    return [
        {
            "name": c.name,
            "code_value": c.code_value,
            "coding_scheme": c.coding_scheme,
            "code_meaning": c.code_meaning,
        }
        for c in classes_for(task)
    ]
