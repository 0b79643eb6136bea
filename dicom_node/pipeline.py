"""The one place where the stages are wired: predict → explain → encode → queue for sending.

Claimed studies come in as :class:`StudyJob`; what comes out is written under the spool's
``outputs/`` and queued for every destination in the same transaction that marks the study
done (:meth:`Spool.complete`, refused when a newer version of the study is already collecting).
The pipeline owns batching (every claimed study through the models at once), isolating a
study that fails (the batch is retried one study at a time) and marking it failed. The
predictor, the encoders and the spool are passed in, so a test can swap any stage. Output UIDs
are derived from (study, task, version, model version), so re-running a job after a crash
produces the same objects, not duplicates.

The saliency of each analysed view goes out as a Secondary Capture, a Segmentation, or both
(``saliency``, conf.yaml's ``outputs.saliency``); the SR lists whichever were made as evidence.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydicom.dataset import Dataset

from dicom_node.domain import Explanation, Outputs, Prediction, PreparedView, StudyJob
from dicom_node.errors import DicomNodeError
from dicom_node.infer import Observe, Predictor
from dicom_node.store import PipelineStore
from dicom_node.tasks import TaskSpec

__all__ = ["Pipeline", "output_uid"]

log = logging.getLogger(__name__)

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/orthonode/outputs")
SR_SERIES_NUMBER = 9001
SC_SERIES_NUMBER = 9002
SEG_SERIES_NUMBER = 9020
#: What ``Pipeline.saliency`` may be: which objects carry each view's saliency.
Saliency = Literal["sc", "segmentation", "both"]
_SALIENCY_OUTPUTS: Mapping[str, tuple[bool, bool]] = {  # (Secondary Capture, Segmentation)
    "sc": (True, False),
    "segmentation": (False, True),
    "both": (True, True),
}


def output_uid(*parts: object) -> str:
    """A deterministic 2.25 UID for an output object."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, chr(31).join(str(p) for p in parts)).int}"


def _ignore(stage: str, seconds: float) -> None:
    return None


@dataclass
class Pipeline:
    """predict → explain → encode → queue, for batches of claimed studies."""

    predictor: Predictor
    spool: PipelineStore
    specs: Mapping[str, TaskSpec]
    destinations: Sequence[str]
    build_structured_report: Callable[..., Dataset]
    build_secondary_capture: Callable[..., Dataset]
    clock: Callable[[], dt.datetime] = dt.datetime.now
    observe: Observe = _ignore
    on_failed: Callable[[str], None] | None = None  # task name; a metric
    on_queued: Callable[[], None] | None = None  # outputs queued: wake the sender
    # An image not answered on: (task, reason); a metric.
    on_not_applicable: Callable[[str, str], None] | None = None
    when_not_applicable: str = "report"  # or "skip": no output for a study not applicable
    saliency: Saliency = "sc"  # each view's saliency as an SC, a Segmentation, or both
    build_segmentation: Callable[..., Dataset] | None = None  # needed unless saliency is "sc"

    def __post_init__(self) -> None:
        if self.saliency not in _SALIENCY_OUTPUTS:
            raise ValueError(f"saliency is one of {list(_SALIENCY_OUTPUTS)}, not {self.saliency!r}")
        if _SALIENCY_OUTPUTS[self.saliency][1] and self.build_segmentation is None:
            raise ValueError(f"saliency {self.saliency!r} needs build_segmentation")

    def process(self, jobs: Sequence[StudyJob]) -> list[Outputs]:
        """Run claimed jobs as one batch; on an error, one by one, marking the failures.

        Returns the outputs queued (superseded versions queue nothing). Never raises for a
        study's fault: every job ends done, failed, or superseded by a newer version.
        """
        if not jobs:
            return []
        try:
            return self.run(jobs)
        except Exception as error:
            if len(jobs) == 1:
                self._fail(jobs[0], error)
                return []
            log.info("a batch of %d studies failed; running them one by one", len(jobs))
        outputs = []
        for job in jobs:
            try:
                outputs += self.run([job])
            except Exception as error:
                self._fail(job, error)
        return outputs

    def _fail(self, job: StudyJob, error: Exception) -> None:
        reason = str(error)
        if not isinstance(error, DicomNodeError):
            # Library messages may quote element values: keep them out of the ERROR log and
            # the spool; the traceback goes to DEBUG only.
            reason = f"unexpected {type(error).__name__} (traceback at DEBUG level)"
            log.debug("study %s traceback", job.study_instance_uid, exc_info=error)
        if self.spool.fail(job, reason):
            log.error("study %s task %s failed: %s", job.study_instance_uid, job.task, reason)
            if self.on_failed is not None:
                self.on_failed(job.task)
        else:
            log.info(
                "study %s task %s v%d failed (%s), but a newer version is already collecting",
                job.study_instance_uid,
                job.task,
                job.version,
                reason,
            )

    def run(self, jobs: Sequence[StudyJob]) -> list[Outputs]:
        """predict → explain → encode → queue for ``jobs``; raises on the first error."""
        results = self.predictor.predict(jobs)
        outputs = []
        for job, (prediction, views) in zip(jobs, results, strict=True):
            paths = self._encode_and_queue(job, prediction, views)
            if paths is None:
                log.info(
                    "study %s task %s v%d superseded while processed: an image arrived; "
                    "the next version analyses every image",
                    job.study_instance_uid,
                    job.task,
                    job.version,
                )
                continue
            if self.on_not_applicable is not None:
                for excluded in prediction.not_applicable:
                    self.on_not_applicable(job.task, excluded.reason)
            if prediction.applicable:
                log.info(
                    "study %s task %s v%d: %s %.1f%% (%d of %d view(s)), %d object(s) queued",
                    job.study_instance_uid,
                    job.task,
                    job.version,
                    "undetermined"
                    if prediction.abstained
                    else prediction.classes[prediction.predicted_index].name,
                    100 * prediction.certainty,
                    len(prediction.views),
                    len(views),
                    len(paths),
                )
            else:
                log.info(
                    "study %s task %s v%d: not applicable (%s), %d object(s) queued",
                    job.study_instance_uid,
                    job.task,
                    job.version,
                    ", ".join(sorted({n.reason for n in prediction.not_applicable})),
                    len(paths),
                )
            if not paths:
                continue
            outputs.append(
                Outputs(
                    study_instance_uid=job.study_instance_uid,
                    task=job.task,
                    structured_report=paths[0],
                    secondary_captures=tuple(p for p in paths[1:] if _is_capture(job, p)),
                    segmentations=tuple(p for p in paths[1:] if not _is_capture(job, p)),
                )
            )
        return outputs

    def _encode_and_queue(
        self, job: StudyJob, prediction: Prediction, views: Sequence[PreparedView]
    ) -> list[Path] | None:
        """Explain each analysed view, build and write its Secondary Capture and/or its
        Segmentation (``saliency``), build and write the SR (which lists them as evidence, and
        the views not applicable, and why), then queue them all and mark the study done in one
        transaction. Returns the paths: the SR, then the SCs, then the Segmentations (empty: a
        study not applicable with ``when_not_applicable: skip``); None when a newer version
        superseded the job (nothing is queued).

        Queuing each SC as soon as it was written, so that it travels while the SR is made,
        was measured and dropped: on 2 cores the sender then competes with encoding for the
        CPU (throughput 1.38 → 1.18 studies/s with 4 in flight, no better p95), and a
        superseded version could leave an SC without its SR in the PACS.
        """
        key = (job.study_instance_uid, job.task, job.version, prediction.model.version)
        spec = self.specs[job.task]
        now = self.clock()
        analysed, excluded = views[: len(prediction.views)], views[len(prediction.views) :]
        if not prediction.applicable and self.when_not_applicable == "skip":
            return [] if self.spool.complete(job, [], list(self.destinations)) else None
        # The SCs follow the sources' series: one SC series per source series, so that a
        # viewer shows each view's overlay as its own series (its own thumbnail, placed by
        # the hanging protocol) when the views came as separate series, and one stack when
        # they came as one. One series for every view made OHIF play AP and LAT as a
        # two-image cine stack behind a single thumbnail, where the LAT is easily missed.
        # The Segmentations follow the sources' series in the same way.
        source_series = list(dict.fromkeys(v.view.instance.series_instance_uid for v in analysed))
        with_sc, with_seg = _SALIENCY_OUTPUTS[self.saliency]
        in_series: dict[str, int] = {}
        secondary: list[Dataset] = []
        segmentations: list[Dataset] = []
        explanations: list[Explanation] = []
        paths: list[Path] = []
        segmentation_paths: list[Path] = []
        for number, view in enumerate(analysed, start=1):
            explanation = self.predictor.explain(view, prediction.predicted_index)
            explanations.append(explanation)
            series = view.view.instance.series_instance_uid
            in_series[series] = in_series.get(series, 0) + 1
            source_uid = view.view.instance.sop_instance_uid
            common = {
                "spec": spec,
                "version": job.version,
                "instance_number": in_series[series],
                "now": now,
            }
            if with_sc:
                started = time.perf_counter()
                capture = self.build_secondary_capture(
                    view.dataset,
                    view.display,
                    explanation,
                    prediction,
                    series_number=SC_SERIES_NUMBER + source_series.index(series),
                    instance_uid=output_uid(*key, "sc", source_uid),
                    series_uid=output_uid(*key, "sc-series", series),
                    **common,
                )
                paths.append(self._write(job, capture, f"sc{number}"))
                self.observe("encode", time.perf_counter() - started)
                secondary.append(capture)
            if with_seg:
                assert self.build_segmentation is not None  # __post_init__ refuses otherwise
                started = time.perf_counter()
                segmentation = self.build_segmentation(
                    view.dataset,
                    explanation,
                    prediction,
                    series_number=SEG_SERIES_NUMBER + source_series.index(series),
                    instance_uid=output_uid(*key, "seg", source_uid),
                    series_uid=output_uid(*key, "seg-series", series),
                    **common,
                )
                segmentation_paths.append(self._write(job, segmentation, f"seg{number}"))
                self.observe("encode", time.perf_counter() - started)
                segmentations.append(segmentation)
        paths += segmentation_paths
        started = time.perf_counter()
        # The SR lists every derived object as evidence with the sources (its parameter is
        # named for the SCs, which were the only ones).
        report = self.build_structured_report(
            prediction,
            [v.dataset for v in analysed],
            [*secondary, *segmentations],
            excluded_sources=[v.dataset for v in excluded],
            explanations=explanations,
            spec=spec,
            version=job.version,
            series_number=SR_SERIES_NUMBER,
            instance_uid=output_uid(*key, "sr"),
            series_uid=output_uid(*key, "sr-series"),
            now=now,
        )
        report_path = self._write(job, report, "sr")
        self.observe("encode", time.perf_counter() - started)
        outputs = [report_path, *paths]
        if not self.spool.complete(job, outputs, list(self.destinations)):
            return None
        self._queued()
        return outputs

    def _queued(self) -> None:
        if self.on_queued is not None:
            self.on_queued()

    def _write(self, job: StudyJob, ds: Dataset, kind: str) -> Path:
        path = self.spool.output_path(job.study_instance_uid, _output_name(job, kind))
        try:
            ds.save_as(path, enforce_file_format=True)
        except (OSError, ValueError) as error:
            raise DicomNodeError(f"cannot write output {path.name}: {error}") from error
        return path


def _output_name(job: StudyJob, kind: str) -> str:
    """The file name of one of a job's outputs: kind "sr", "sc1", "sc2"..., "seg1"..."""
    return f"{job.task}-v{job.version}-{kind}.dcm"


def _is_capture(job: StudyJob, path: Path) -> bool:
    """Whether ``path`` is one of the job's Secondary Captures ("sc1", "sc2"...)."""
    prefix = Path(_output_name(job, "sc")).stem
    return path.stem.startswith(prefix) and path.stem[len(prefix) :].isdigit()
