"""Study assembly: route what arrived, and decide when a study is ready for its task.

A study is ready as soon as every view its task needs is present (knee and spine: AP and
lateral; hip: AP), or once it has been quiet for ``stable_after_s`` with at least one view. The
clock is injected, so tests decide what "now" is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.config import RoutingRule
from dicom_node.domain import RoutedView, StudyJob
from dicom_node.route import route
from dicom_node.store import Spool

__all__ = ["REQUIRED_VIEWS", "Assembler", "is_ready", "latest_views"]

log = logging.getLogger(__name__)

REQUIRED_VIEWS: dict[str, tuple[str, ...]] = {
    "knee": ("AP", "LAT"),
    "hip": ("AP",),
    "spine": ("AP", "LAT"),
}
_ROUTING_TAGS = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "SeriesDescription",
    "ProtocolName",
    "ImageLaterality",
    "Laterality",
)


def is_ready(
    task: str, views: set[str], last_received_at: float, now: float, stable_after_s: float
) -> bool:
    """True when every required view is present, or the study has been quiet long enough."""
    if not views:
        return False
    if set(REQUIRED_VIEWS[task]) <= views:
        return True
    return now - last_received_at >= stable_after_s


def latest_views(views: Sequence[RoutedView]) -> tuple[RoutedView, ...]:
    """One instance per view — the last received — in AP, LAT order."""
    chosen: dict[str, RoutedView] = {}
    for view in views:  # oldest first, so later ones replace earlier ones
        chosen[view.view] = view
    return tuple(chosen[v] for v in ("AP", "LAT") if v in chosen)


class Assembler:
    """Routes newly stored instances and promotes collecting studies to 'ready'."""

    def __init__(
        self,
        spool: Spool,
        rules: Sequence[RoutingRule],
        tasks: set[str],
        stable_after_s: float,
        clock: Callable[[], float],
        on_unmatched: Callable[[], None] | None = None,
    ) -> None:
        self.spool = spool
        self.rules = list(rules)
        self.tasks = tasks
        self.stable_after_s = stable_after_s
        self.clock = clock
        self.on_unmatched = on_unmatched

    def route_new(self) -> int:
        """Route every unrouted instance; returns how many were looked at."""
        instances = self.spool.unrouted()
        for instance in instances:
            try:
                ds = pydicom.dcmread(instance.path, stop_before_pixels=True)
                tags = {key: ds.get(key) for key in _ROUTING_TAGS}
                decision = route(tags, self.rules)
            except (OSError, InvalidDicomError, ValueError) as error:
                log.warning(
                    "cannot read header for routing: %s",
                    error,
                    extra={"sop_instance_uid": instance.sop_instance_uid},
                )
                decision = None
            if decision is None or decision.task not in self.tasks:
                self.spool.mark_routed(instance, None, None, None)
                log.info(
                    "no routing rule matched instance %s of study %s; ignored",
                    instance.sop_instance_uid,
                    instance.study_instance_uid,
                )
                if self.on_unmatched:
                    self.on_unmatched()
                continue
            self.spool.mark_routed(instance, decision.task, decision.view, decision.laterality)
        return len(instances)

    def promote_ready(self) -> list[StudyJob]:
        """Move ready studies from 'collecting' to 'ready' and return their jobs."""
        now = self.clock()
        jobs = []
        for study in self.spool.collecting():
            job = self.job(study.study_instance_uid, study.task, study.version)
            present = {view.view for view in job.views}
            if not is_ready(study.task, present, study.last_received_at, now, self.stable_after_s):
                continue
            if self.spool.set_study_state(
                study.study_instance_uid,
                study.task,
                "ready",
                expect="collecting",
                version=study.version,
            ):
                jobs.append(job)
        return jobs

    def job(self, study_instance_uid: str, task: str, version: int) -> StudyJob:
        rows = self.spool.study_views(study_instance_uid, task)
        views = [
            RoutedView(instance=ref, task=task, view=view, laterality=laterality)
            for ref, view, laterality in rows
        ]
        return StudyJob(
            study_instance_uid=study_instance_uid,
            task=task,
            views=latest_views(views),
            version=version,
        )
