"""The task registry: one :class:`TaskSpec` per clinical task, the only place its facts live.

A task's facts are what the node needs besides the weights: what it reports (the label a reader
sees), the SR's finding, finding site and evaluation codes, the default routing rule, the views
a bundle made for it is trained on, and the default classes with their codes. The built-in
tasks (knee, hip, spine) are data in ``dicom_node/tasks.yaml``; a site adds a task with a
bundle plus a ``spec:`` of the same shape under ``tasks.<name>`` in conf.yaml — no code change
(docs/operations.md, "Adding a task"). Which views make a study ready comes from each bundle's
``card.views``, not from here: a bundle trained on one view is served on one view.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from dicom_node.domain import ClassInfo

__all__ = [
    "TASK_NAME_PATTERN",
    "CardClass",
    "Code",
    "RoutingDefaults",
    "TaskSpec",
    "builtin_task",
    "builtin_tasks",
]

#: Task names: lower case, digits and dashes (they appear in file names and metric labels).
TASK_NAME_PATTERN = r"^[a-z][a-z0-9-]{0,31}$"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Code(_Frozen):
    """A coded concept: (CodeValue, CodingSchemeDesignator, CodeMeaning)."""

    value: str = Field(min_length=1, max_length=16, description="CodeValue (≤ 16 characters)")
    scheme: str = Field(min_length=1, max_length=16, description="e.g. SCT, DCM, 99ORTHONODE")
    meaning: str = Field(min_length=1, max_length=64, description="CodeMeaning, readable")


class CardClass(_Frozen):
    """One output class, as card.json and the task spec list it."""

    name: str = Field(min_length=1, max_length=64, description="display name")
    code_value: str = Field(min_length=1, max_length=16)
    coding_scheme: str = Field(min_length=1, max_length=16)
    code_meaning: str = Field(min_length=1, max_length=64)


class RoutingDefaults(_Frozen):
    """The routing rule a task gets when conf.yaml's ``routing:`` does not say otherwise."""

    modality: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    body_part: list[str] = Field(min_length=1, description="normalised BodyPartExamined values")
    series_description: str | None = None


class TaskSpec(_Frozen):
    """Everything the node knows about a task apart from its weights."""

    name: str = Field(pattern=TASK_NAME_PATTERN)
    label: str = Field(min_length=1, max_length=48, description="what the task reports")
    finding: Code
    site: Code
    evaluation: Code
    routing: RoutingDefaults
    views: list[str] = Field(default_factory=lambda: ["AP", "LAT"], min_length=1)
    classes: list[CardClass] = Field(min_length=2)
    anatomy: str | None = Field(
        default=None,
        pattern=r"^[a-z][a-z0-9-]{0,31}$",
        description="the body part the image check must see (knee, hip, spine); "
        "None: the image check does not judge anatomy for this task",
    )

    def class_infos(self) -> tuple[ClassInfo, ...]:
        """The default classes as the stages pass them on."""
        return tuple(
            ClassInfo(
                index=i,
                name=c.name,
                code_value=c.code_value,
                coding_scheme=c.coding_scheme,
                code_meaning=c.code_meaning,
            )
            for i, c in enumerate(self.classes)
        )

    def card_classes(self) -> list[dict[str, str]]:
        """The default classes as card.json lists them."""
        return [c.model_dump() for c in self.classes]


def parse_spec(name: str, data: dict[str, Any]) -> TaskSpec:
    """A spec from its YAML mapping; ``name`` is the key it is filed under."""
    return TaskSpec.model_validate({**data, "name": name})


@functools.cache
def builtin_tasks() -> dict[str, TaskSpec]:
    """The tasks that ship with the node (``dicom_node/tasks.yaml``), by name."""
    text = resources.files("dicom_node").joinpath("tasks.yaml").read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    return {name: parse_spec(name, data) for name, data in raw.items()}


def builtin_task(name: str) -> TaskSpec:
    """The built-in spec of ``name``; ValueError naming the known tasks when there is none."""
    try:
        return builtin_tasks()[name]
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}; the built-in tasks are {sorted(builtin_tasks())} "
            "(another task needs a spec: in conf.yaml)"
        ) from None
