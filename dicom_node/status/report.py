"""The node's SR read back: as indented text, as one summary line, as sections for a page.

Everything here reads the SR's content tree only (the TID 1500 document has no patient module
in its content), so what it returns carries codes, numbers, UIDs and the node's own texts.
A percentage read from a NUM item is worded with the rounding rule of
:func:`dicom_node.wording.percent_text` ("<1 %", ">99 %"); TEXT items are shown as the SR
words them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from dicom_node.wording import percent_text

__all__ = [
    "ANSWERED",
    "NOT_APPLICABLE",
    "NO_REPORT",
    "ReadBack",
    "Row",
    "Section",
    "read_report",
    "sr_outcome",
    "sr_sections",
    "sr_summary",
    "sr_text",
]

ANSWERED = "answered"
NOT_APPLICABLE = "not-applicable"
NO_REPORT = "no-report"  # done, but no SR to read (outputs.when_not_applicable: skip, or gone)

_NOT_APPLICABLE_CODE = ("385432009", "SCT")
_GROUP = "Measurement Group"
_EVALUATIONS = "Qualitative Evaluations"


def _items(sequence: Any) -> Iterator[Dataset]:
    yield from sequence or []


def _name(item: Dataset) -> str:
    concept = item.get("ConceptNameCodeSequence")
    return str(concept[0].CodeMeaning) if concept else ""


def _code(item: Dataset) -> tuple[str, str] | None:
    if item.get("ValueType") != "CODE" or not item.get("ConceptCodeSequence"):
        return None
    code = item.ConceptCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def _number(value: float, units: str) -> str:
    if units == "%" and 0.0 <= value <= 100.0:
        return percent_text(value / 100.0)
    if units in ("{pixels}", "1"):
        return f"{value:g}"
    return f"{value:g} {units}"


def _value(item: Dataset) -> str:
    kind = item.get("ValueType", "")
    if kind == "CODE" and item.get("ConceptCodeSequence"):
        return str(item.ConceptCodeSequence[0].CodeMeaning)
    if kind == "TEXT":
        return str(item.get("TextValue", ""))
    if kind == "NUM":
        measured = item.get("MeasuredValueSequence")
        if not measured:
            return "(no value)"
        units = str(measured[0].MeasurementUnitsCodeSequence[0].CodeValue)
        return _number(float(measured[0].NumericValue), units)
    if kind == "UIDREF":
        return str(item.get("UID", ""))
    if kind in ("IMAGE", "COMPOSITE") and item.get("ReferencedSOPSequence"):
        return str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return ""


def _lines(sequence: Any, depth: int) -> Iterator[str]:
    for item in _items(sequence):
        value = _value(item)
        yield "  " * depth + _name(item) + (f": {value}" if value else "")
        yield from _lines(item.get("ContentSequence"), depth + 1)


def sr_text(report: Dataset) -> str:
    """The SR's title and content tree as indented text (what a viewer shows)."""
    title = _name(report) or "Structured Report"
    return "\n".join([title, *_lines(report.get("ContentSequence"), 1)]) + "\n"


def _walk(sequence: Any) -> Iterator[Dataset]:
    for item in _items(sequence):
        yield item
        yield from _walk(item.get("ContentSequence"))


def _evaluations(report: Dataset) -> list[Dataset]:
    """The items of the document's own Qualitative Evaluations container."""
    for item in _items(report.get("ContentSequence")):
        if item.get("ValueType") == "CONTAINER" and _name(item) == _EVALUATIONS:
            return list(_items(item.get("ContentSequence")))
    return []


def sr_outcome(report: Dataset) -> str:
    """``not-applicable`` when the document's evaluation is Not applicable (SNOMED CT
    385432009: no image was analysed), else ``answered``."""
    for item in _evaluations(report):
        if _code(item) == _NOT_APPLICABLE_CODE:
            return NOT_APPLICABLE
    return ANSWERED


def _coded(group: Dataset) -> list[tuple[str, str]]:
    """A measurement group's coded answers: (concept name, value), the Finding left out."""
    return [
        (_name(item), _value(item))
        for item in _items(group.get("ContentSequence"))
        if item.get("ValueType") == "CODE"
        and item.get("RelationshipType") == "CONTAINS"
        and _name(item) != "Finding"
    ]


def _answer(group: Dataset) -> str:
    """A measurement group's coded answers and certainty, in one phrase ('' when it has no
    coded answer, as a saliency-peak group)."""
    answers = [f"{name}: {value}" for name, value in _coded(group)]
    certainty = ""
    for item in _items(group.get("ContentSequence")):
        if _name(item) == "Certainty of Finding":
            certainty = _value(item)
    if not answers:
        return ""
    return "; ".join(answers) + (f" (certainty {certainty})" if certainty else "")


def _tracking(group: Dataset) -> str:
    for item in _items(group.get("ContentSequence")):
        if _name(item) == "Tracking Identifier":
            return _value(item)
    return ""


def sr_summary(report: Dataset) -> str:
    """One line: the study-level result — the SR's own result statement when it has one (the
    first comment of its evaluations, naming the study-level group's answer), else that
    group's coded answers and certainty (else the last group's that has some) — with the
    images not answered on; or the reason the study was not answered on."""
    evaluations = _evaluations(report)
    reasons = [
        _value(item)
        for item in evaluations
        if _code(item) is not None and _code(item) != _NOT_APPLICABLE_CODE
    ]
    if sr_outcome(report) == NOT_APPLICABLE:
        why = ", ".join(dict.fromkeys(reasons))
        return f"not applicable: {why}" if why else "not applicable"
    groups = [i for i in _walk(report.get("ContentSequence")) if _name(i) == _GROUP]
    answered = [g for g in groups if _answer(g)]
    if answered:
        study_level = [g for g in answered if "study-level" in _tracking(g)]
        chosen = study_level[-1] if study_level else answered[-1]
        line = _answer(chosen)
        # The SR's own result statement (its first comment, worded by dicom_node.wording),
        # when it names the same answer: the page then says what the SR and the SC say.
        first = evaluations[0] if evaluations else None
        if first is not None and first.get("ValueType") == "TEXT":
            statement = _value(first)
            if all(value in statement for _, value in _coded(chosen)):
                line = statement
        if reasons:
            line += f"; {len(reasons)} image(s) not applicable: {', '.join(dict.fromkeys(reasons))}"
        return line
    # An SR without any group: its comments, if any, say why.
    comments = [
        _value(i)
        for i in _walk(report.get("ContentSequence"))
        if i.get("ValueType") == "TEXT" and _name(i) == "Comment"
    ]
    if comments:
        return "; ".join(dict.fromkeys(comments))
    return "(no finding in the report)"


@dataclass(frozen=True)
class Row:
    """One content item: its concept name, its value as text, and how deep it sits."""

    name: str
    value: str
    depth: int = 0


@dataclass(frozen=True)
class Section:
    """A part of the SR a reader takes in at once: a measurement group (titled by its
    Tracking Identifier), the document's evaluations, its image library, its observer."""

    title: str
    kind: str  # evaluations | group (with a coded answer) | detail | library | document
    rows: tuple[Row, ...] = field(default_factory=tuple)


def _rows(sequence: Any, depth: int, skip: tuple[str, ...] = ()) -> Iterator[Row]:
    for item in _items(sequence):
        name = _name(item)
        if name in skip:
            continue
        yield Row(name, _value(item), depth)
        yield from _rows(item.get("ContentSequence"), depth + 1)


def sr_sections(report: Dataset) -> list[Section]:
    """The SR as sections, in the order a reader wants them: the evaluations (the result or
    why there is none), the measurement groups with a coded answer (the study-level one
    first), the groups without one (``detail``: a saliency peak's region), then the image
    library and the document's observer context."""
    evaluations: list[Section] = []
    groups: list[Section] = []
    library: list[Section] = []
    document: list[Row] = []
    for item in _items(report.get("ContentSequence")):
        name = _name(item)
        if item.get("ValueType") != "CONTAINER":
            document.append(Row(name, _value(item)))
            continue
        if name == _EVALUATIONS:
            evaluations.append(
                Section(_EVALUATIONS, "evaluations", tuple(_rows(item.get("ContentSequence"), 0)))
            )
        elif name == "Image Library":
            library.append(Section(name, "library", tuple(_rows(item.get("ContentSequence"), 0))))
        else:
            for group in _walk(item.get("ContentSequence")):
                if _name(group) != _GROUP:
                    continue
                title = _tracking(group) or _GROUP
                rows = _rows(group.get("ContentSequence"), 0, skip=("Tracking Identifier",))
                kind = "group" if _answer(group) else "detail"
                groups.append(Section(title, kind, tuple(rows)))
    groups.sort(key=lambda g: (g.kind != "group", "study-level" not in g.title))
    observer = [Section("Document", "document", tuple(document))] if document else []
    return [*evaluations, *groups, *library, *observer]


@dataclass(frozen=True)
class ReadBack:
    """What the status page shows of one SR file."""

    outcome: str
    summary: str
    text: str
    sections: tuple[Section, ...]
    title: str


@functools.lru_cache(maxsize=256)
def _read(path: Path, stamp: float) -> ReadBack:
    report = pydicom.dcmread(path)
    return ReadBack(
        sr_outcome(report),
        sr_summary(report),
        sr_text(report),
        tuple(sr_sections(report)),
        _name(report) or "Structured Report",
    )


def read_report(path: Path) -> ReadBack:
    """An SR file read back (cached while the file is unchanged). Raises ``OSError`` or a
    pydicom error for a file that cannot be read."""
    return _read(path, path.stat().st_mtime)
