"""The node's health in one word — ready, degraded or not ready — and why.

*Not ready* is what ``/readyz`` has always meant (503): a part of the node cannot take or
process studies now (models not loaded, DICOM listener down, a worker stopped, the spool full or
not writable). *Degraded* (200, the node still accepts) means something waits for an
administrator: dead letters, or studies that failed, at or over the thresholds of ``health:``
in conf.yaml (:class:`~dicom_node.config.HealthConfig`). The rule is :func:`assess`; ``/readyz``,
the status page's header, ``orthonode_health_state`` and ``python -m dicom_node status`` all
use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dicom_node.config import HealthConfig

__all__ = ["DEGRADED", "LEVELS", "NOT_READY", "READY", "Health", "assess", "store_warnings"]

READY = "ready"
DEGRADED = "degraded"
NOT_READY = "not ready"
#: ``orthonode_health_state``: 0 ready, 1 degraded, 2 not ready.
LEVELS = {READY: 0, DEGRADED: 1, NOT_READY: 2}


@dataclass(frozen=True)
class Health:
    """The state, each part's problems (empty: ok) and the warnings."""

    state: str
    checks: Mapping[str, Sequence[str]]
    warnings: tuple[str, ...] = ()

    @property
    def ready(self) -> bool:
        return self.state != NOT_READY

    @property
    def level(self) -> int:
        return LEVELS[self.state]

    def as_json(self) -> dict[str, Any]:
        """What ``/readyz`` answers (and the status page's JSON carries)."""
        return {
            "ready": self.ready,
            "state": self.state,
            "checks": {name: list(found) or "ok" for name, found in self.checks.items()},
            "warnings": list(self.warnings),
        }


def assess(checks: Mapping[str, Sequence[str]], warnings: Sequence[str] = ()) -> Health:
    """Not ready when any check has a problem; else degraded when there is a warning."""
    if any(checks.values()):
        state = NOT_READY
    elif warnings:
        state = DEGRADED
    else:
        state = READY
    return Health(state, dict(checks), tuple(warnings))


def store_warnings(*, dead_letters: int, failed: int, settings: HealthConfig) -> list[str]:
    """The warnings for what waits in the spool: ``dead_letters`` (now) and ``failed``
    (studies failed within ``settings.failed_window_h``)."""
    found = []
    if settings.dead_letters_warning and dead_letters >= settings.dead_letters_warning:
        found.append(
            f"{dead_letters} dead letter(s) wait to be requeued "
            f"(health.dead_letters_warning: {settings.dead_letters_warning})"
        )
    if settings.failed_studies_warning and failed >= settings.failed_studies_warning:
        found.append(
            f"{failed} study job(s) failed in the last {settings.failed_window_h:g} h "
            f"(health.failed_studies_warning: {settings.failed_studies_warning})"
        )
    return found
