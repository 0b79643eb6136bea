"""The bundled demo weights: load as the shipped conf.yaml names them and name the true class."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import load_config
from dicom_node.infer import Predictor
from dicom_node.service import load_bundles
from tests.conftest import make_set
from train.data import read_dataset
from train.evaluate import study_jobs

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_conf_loads_every_bundle() -> None:
    bundles = load_bundles(load_config(ROOT / "conf.yaml"))
    assert set(bundles) == {"knee", "hip", "spine"}
    for task, bundle in bundles.items():
        assert bundle.card.task == task and bundle.card.demo is True
        assert bundle.card.training["command"].startswith("python -m train fit")
    total = sum(p.stat().st_size for p in (ROOT / "weights").rglob("*") if p.is_file())
    assert total < 40 * 2**20


@pytest.mark.parametrize(
    ("task", "patients", "needed"), [("knee", 30, 29), ("spine", 30, 28), ("hip", 30, 26)]
)
def test_demo_weights_name_the_true_class(
    tmp_path: Path, task: str, patients: int, needed: int
) -> None:
    """Fresh detector-sized phantoms (a seed no bundle saw): the published accuracy or better
    (knee 0.964, spine 0.943; hip: sensitivity 0.916 at specificity 0.75), to one study."""
    bundles = load_bundles(load_config(ROOT / "conf.yaml"))
    folder = make_set(tmp_path, task, task=task, patients=patients, seed=900, rows=1024, cols=1024)
    jobs, studies = study_jobs(read_dataset(folder))
    results = Predictor({task: bundles[task]}).predict(jobs)
    correct = sum(
        prediction.predicted_index == studies[prediction.study_instance_uid][0].label_index
        for prediction, _ in results
    )
    assert correct >= needed, f"{correct}/{len(jobs)} correct"
    for _, prepared in results:
        # Every view was located: the classifier read the region around the implant.
        assert all(view.region is not None and view.region.found for view in prepared)
