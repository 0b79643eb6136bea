"""The one place where the stages are wired: predict → explain → encode → queue for sending.

Ready studies come in as :class:`StudyJob`; what comes out is written under the spool's
``outputs/`` and queued for every destination. The encoders and the explainer are passed in,
so a test can swap any stage. Output UIDs are derived from (study, task, version, model
version), so re-running a job after a crash produces the same objects, not duplicates.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from dicom_node.domain import Outputs, StudyJob
from dicom_node.errors import DicomNodeError
from dicom_node.explain import explain
from dicom_node.infer import Predictor
from dicom_node.store import Spool

__all__ = ["Pipeline", "output_uid"]

log = logging.getLogger(__name__)

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/orthonode/outputs")
SR_SERIES_NUMBER = 9001
SC_SERIES_NUMBER = 9002


def output_uid(*parts: object) -> str:
    """A deterministic 2.25 UID for an output object."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, chr(31).join(str(p) for p in parts)).int}"


@dataclass
class Pipeline:
    """predict → explain → encode → enqueue, for batches of ready studies."""

    predictor: Predictor
    spool: Spool
    destinations: Sequence[str]
    build_structured_report: Callable[..., Dataset]
    build_secondary_capture: Callable[..., Dataset]
    saliency: str = "gradcam"
    explainer: Callable[..., object] = explain
    clock: Callable[[], dt.datetime] = dt.datetime.now

    def run(self, jobs: Sequence[StudyJob]) -> list[Outputs]:
        outputs = []
        for prediction, views in self.predictor.predict(jobs):
            job = next(
                j
                for j in jobs
                if j.study_instance_uid == prediction.study_instance_uid
                and j.task == prediction.task
            )
            key = (job.study_instance_uid, job.task, job.version, prediction.model.version)
            bundle = self.predictor.bundles[job.task]
            now = self.clock()
            secondary = []
            sc_series = output_uid(*key, "sc-series")
            for number, view in enumerate(views, start=1):
                explanation = self.explainer(
                    bundle, view, prediction.predicted_index, self.saliency, self.predictor.device
                )
                secondary.append(
                    self.build_secondary_capture(
                        view.dataset,
                        view.display,
                        explanation,
                        prediction,
                        series_number=SC_SERIES_NUMBER,
                        instance_number=number,
                        instance_uid=output_uid(*key, "sc", view.view.instance.sop_instance_uid),
                        series_uid=sc_series,
                        now=now,
                    )
                )
            report = self.build_structured_report(
                prediction,
                [v.dataset for v in views],
                secondary,
                series_number=SR_SERIES_NUMBER,
                instance_uid=output_uid(*key, "sr"),
                series_uid=output_uid(*key, "sr-series"),
                now=now,
            )
            paths = [self._write(job, report, "sr")]
            paths += [self._write(job, sc, f"sc{i + 1}") for i, sc in enumerate(secondary)]
            self.spool.enqueue(job.study_instance_uid, job.task, paths, list(self.destinations))
            log.info(
                "study %s task %s v%d: %s %.1f%% (%d view(s)), %d object(s) queued",
                job.study_instance_uid,
                job.task,
                job.version,
                "undetermined"
                if prediction.abstained
                else prediction.classes[prediction.predicted_index].name,
                100 * prediction.certainty,
                len(views),
                len(paths),
            )
            outputs.append(
                Outputs(
                    study_instance_uid=job.study_instance_uid,
                    task=job.task,
                    structured_report=paths[0],
                    secondary_captures=tuple(paths[1:]),
                )
            )
        return outputs

    def _write(self, job: StudyJob, ds: Dataset, kind: str) -> Path:
        path = self.spool.output_path(
            job.study_instance_uid, f"{job.task}-v{job.version}-{kind}.dcm"
        )
        try:
            ds.save_as(path, enforce_file_format=True)
        except (OSError, ValueError) as error:
            raise DicomNodeError(f"cannot write output {path.name}: {error}") from error
        return path
