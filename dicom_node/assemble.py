"""Study assembly: route what arrived, and decide when a study is ready for its task.

A study is ready as soon as every view its task's bundle was trained on is present
(``card.views``: knee and spine AP + lateral, hip AP), or once it has been quiet for
``stable_after_s`` with at least one view. The decision is the spool's transition
(:meth:`~dicom_node.store.Spool.promote_ready`); this stage reads headers, applies the routing
rules and tells the spool what "ready" means. The clock is injected, so tests decide what
"now" is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.config import RoutingRule
from dicom_node.domain import InstanceRef
from dicom_node.route import Route, route
from dicom_node.store import Spool

__all__ = ["ROUTING_TAGS", "Assembler"]

log = logging.getLogger(__name__)

#: The header attributes the routing rules read.
ROUTING_TAGS = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "SeriesDescription",
    "ProtocolName",
    "ImageLaterality",
    "Laterality",
)


class Assembler:
    """Routes newly stored instances and promotes collecting studies to 'ready'.

    Parameters
    ----------
    spool : Spool
        The store; every state change goes through it.
    rules : Sequence[RoutingRule]
        The routing rules, in order.
    required_views : Mapping[str, Collection[str]]
        Per served task, the views that make a study complete (its bundle's ``card.views``).
    stable_after_s : float
        A study with some of its views is processed after this much quiet.
    clock : callable
        Seconds, on the spool's clock.
    on_unmatched : callable, optional
        Called for each instance no rule matched (a metric).
    image_route : callable, optional
        ``routing.image_check: fallback``: ``image_route(instance)`` reads the image and says
        which (task, view) it shows, or None when unsure. It decides when the tags match no
        rule or contradict it; the tags' laterality is kept.
    """

    def __init__(
        self,
        spool: Spool,
        rules: Sequence[RoutingRule],
        required_views: Mapping[str, Collection[str]],
        stable_after_s: float,
        clock: Callable[[], float],
        on_unmatched: Callable[[], None] | None = None,
        image_route: Callable[[InstanceRef], tuple[str, str] | None] | None = None,
    ) -> None:
        self.spool = spool
        self.rules = list(rules)
        self.required_views = {task: frozenset(views) for task, views in required_views.items()}
        self.stable_after_s = stable_after_s
        self.clock = clock
        self.on_unmatched = on_unmatched
        self.image_route = image_route

    def route_new(self) -> int:
        """Route every unrouted instance; returns how many were looked at."""
        instances = self.spool.unrouted()
        for instance in instances:
            try:
                ds = pydicom.dcmread(instance.path, stop_before_pixels=True)
                tags = {key: ds.get(key) for key in ROUTING_TAGS}
                decision = route(tags, self.rules)
            except (OSError, InvalidDicomError, ValueError) as error:
                log.warning(
                    "cannot read header for routing: %s",
                    error,
                    extra={"sop_instance_uid": instance.sop_instance_uid},
                )
                decision, tags = None, {}
            if self.image_route is not None:
                decision = self._by_image(instance, tags, decision)
            if decision is None or decision.task not in self.required_views:
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

    def _by_image(
        self, instance: InstanceRef, tags: Mapping[str, object], decision: Route | None
    ) -> Route | None:
        """``fallback``: the image's (task, view) where the tags are missing or contradict it."""
        assert self.image_route is not None
        try:
            seen = self.image_route(instance)
        except Exception as error:  # an undecodable image: the tags decide
            log.warning(
                "image check of instance %s for routing failed: %s",
                instance.sop_instance_uid,
                type(error).__name__,
            )
            return decision
        if seen is None or seen[0] not in self.required_views:
            return decision
        if decision is not None and (decision.task, decision.view) == seen:
            return decision
        side = str(tags.get("ImageLaterality") or tags.get("Laterality") or "").upper()
        laterality = decision.laterality if decision else (side if side in ("R", "L") else None)
        log.info(
            "instance %s of study %s routed by its image to %s %s (tags: %s)",
            instance.sop_instance_uid,
            instance.study_instance_uid,
            seen[0],
            seen[1],
            f"{decision.task} {decision.view}" if decision else "no rule matched",
        )
        return Route(task=seen[0], view=seen[1], laterality=laterality)

    def promote(self) -> int:
        """Promote every study that is complete or quiet; returns how many became ready."""
        return self.spool.promote_ready(self.required_views, self.clock() - self.stable_after_s)

    def seconds_to_next_deadline(self) -> float | None:
        """Until the quiet period of the longest-waiting collecting study ends (None: none)."""
        oldest = self.spool.next_quiet_deadline()
        if oldest is None:
            return None
        return max(0.0, oldest + self.stable_after_s - self.clock())
