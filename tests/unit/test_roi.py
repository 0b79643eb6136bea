"""The region-of-interest stage: boxes from the localiser's map, crops, bundles that carry it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.domain import (
    ClassInfo,
    InstanceRef,
    ModelInfo,
    Prediction,
    RegionOfInterest,
    RoutedView,
    ViewPrediction,
)
from dicom_node.errors import BundleError
from dicom_node.explain import explain
from dicom_node.infer import Predictor
from dicom_node.models.backbones import build_backbone
from dicom_node.models.bundle import load_bundle, save_bundle
from dicom_node.models.codes import card_classes
from dicom_node.models.localiser import STRIDE, Localiser, boxes_from_probabilities
from dicom_node.preprocess import crop_square, heatmap_to_source
from train.data import mask_target, read_dataset
from train.predict import study_jobs


def test_box_maps_cells_back_to_source_pixels() -> None:
    # A 400 × 200 image in a 64 px input: scale 0.16, the image spans input columns 16..47.
    cells = 64 // STRIDE
    probability = np.zeros((1, cells, cells))
    probability[0, 3, 3] = 0.9  # input rows 24..31, columns 24..31
    [region] = boxes_from_probabilities(probability, [(400, 200)], threshold=0.5, margin=0.0)
    assert region.found
    # rows 24/0.16 .. 32/0.16 = 150..200; columns (24-16)/0.16 .. (32-16)/0.16 = 50..100;
    # the minimum side (10 % of 400 = 40) is below 50, so the square is 50 px around the centre.
    assert (region.top, region.left, region.side) == (150, 50, 50)


def test_box_ignores_small_stray_groups_and_grows_by_the_margin() -> None:
    probability = np.zeros((1, 16, 16))
    probability[0, 4:8, 4:8] = 0.95  # the implant
    probability[0, 14, 14] = 0.6  # a stray cell: 0.6 < 0.2 × 15.2
    [region] = boxes_from_probabilities(probability, [(128, 128)], threshold=0.5, margin=0.25)
    # cells 4..7 → pixels 32..64 (scale 1): side 32 → 48 with the margin, centred on 48.
    assert (region.top, region.left, region.side) == (24, 24, 48)
    both = probability.copy()
    both[0, 14, 14] = 0.95
    both[0, 13, 13] = 0.95
    both[0, 14, 13] = 0.95
    both[0, 13, 14] = 0.95  # a second real component (a knee's tibial part): kept
    [wide] = boxes_from_probabilities(both, [(128, 128)], threshold=0.5, margin=0.0)
    assert wide.top <= 32 and wide.top + wide.side >= 120


def test_nothing_located_gives_the_whole_image() -> None:
    [region] = boxes_from_probabilities(np.zeros((1, 8, 8)), [(100, 60)], 0.5, 0.1)
    assert not region.found
    assert (region.top, region.side) == (0, 100) and region.left == -20


def test_crop_and_paste_back_are_inverse() -> None:
    image = np.arange(100 * 80, dtype=np.float32).reshape(100, 80) / 8000
    region = RegionOfInterest(top=-10, left=50, side=40)  # past the top and right edges
    crop = crop_square(image, region)
    assert crop.shape == (40, 40)
    assert np.all(crop[:10] == 0) and np.all(crop[:, 30:] == 0)
    assert np.array_equal(crop[10:, :30], image[0:30, 50:80])
    heat = heatmap_to_source(np.ones((16, 16), dtype=np.float32), 100, 80, region)
    assert heat.shape == (100, 80)
    assert heat[:30, 50:].min() > 0.99 and heat[30:].max() == 0 and heat[:, :50].max() == 0


def test_mask_target_marks_thin_structures() -> None:
    mask = np.zeros((512, 512), dtype=np.uint8)
    mask[100, 200:300] = 255  # a one-pixel line
    target = mask_target(mask, 256)
    assert target.shape == (1, 32, 32)
    row = 100 * 256 // 512 // STRIDE
    # columns 200..300 → 100..150 at 256 px → cells 12..18, all on one row of cells.
    assert target[0, row].sum() == 7 and target.sum() == 7


def _roi_bundle(tmp_path: Path, **card: object) -> Path:
    torch.manual_seed(3)
    fields = {
        "task": "hip",
        "name": "test hip",
        "version": "0.0.1-test",
        "device_uid": "2.25.7",
        "classes": card_classes("hip"),
        "backbone": "orthonode_cnn",
        "input_size": 64,
        "channels": 1,
        "normalisation": "standardise",
        "roi": {"input_size": 128, "threshold": 0.5, "margin": 0.1, "sha256": ""},
        **card,
    }
    localiser = Localiser()
    with torch.no_grad():  # a localiser that finds "implant" in every cell
        localiser.head.bias.fill_(10.0)
        localiser.head.weight.zero_()
    save_bundle(tmp_path / "b", build_backbone("orthonode_cnn", 2), fields, localiser)
    return tmp_path / "b"


def test_bundle_with_a_localiser_round_trips_and_checks_its_sha256(tmp_path: Path) -> None:
    path = _roi_bundle(tmp_path)
    bundle = load_bundle(path)
    assert bundle.localiser is not None and bundle.card.roi is not None
    assert bundle.card.roi.file == "localiser.pt" and len(bundle.card.roi.sha256) == 64
    weights = path / "localiser.pt"
    weights.write_bytes(weights.read_bytes() + b"x")
    with pytest.raises(BundleError, match=r"localiser\.pt sha256"):
        load_bundle(path)
    weights.unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(path)


def test_predictor_crops_and_explain_stays_in_the_region(tmp_path: Path) -> None:
    from tests.conftest import make_set

    bundle = load_bundle(_roi_bundle(tmp_path))
    folder = make_set(tmp_path, "h", task="hip", patients=1, seed=5, rows=300, cols=200)
    jobs, _ = study_jobs(read_dataset(folder))
    [(prediction, [view])] = Predictor({"hip": bundle}).predict(jobs)
    region = prediction.views[0].region
    # Every cell is "implant": the region is the whole (padded) image, grown by the margin.
    assert region is not None and region.found and region == view.region
    assert region.side >= 300 and region.top < 0
    heat = explain(bundle, view, prediction.predicted_index, "gradcam").heatmap
    assert heat.shape == (300, 200)


def test_decision_threshold_sets_the_predicted_class() -> None:
    classes = tuple(ClassInfo(i, n, str(i), "SCT", n) for i, n in enumerate(["no", "yes"]))
    view = RoutedView(InstanceRef("1", "", "2", "", Path("x")), "hip", "AP")

    def predicted(p_yes: float, decision: float | None) -> tuple[int, float, bool]:
        prediction = Prediction(
            "2",
            "hip",
            classes,
            (ViewPrediction(view, (1 - p_yes, p_yes)),),
            None,
            threshold=0.0 if decision is not None else 0.6,
            model=ModelInfo("m", "1", "2.25.1"),
            decision_threshold=decision,
        )
        return prediction.predicted_index, prediction.certainty, prediction.abstained

    assert predicted(0.3, 0.25) == (1, 0.3, False)  # at the operating point: positive
    assert predicted(0.2, 0.25) == (0, 0.8, False)
    assert predicted(0.3, None) == (0, 0.7, False)  # argmax without one
    assert predicted(0.45, None) == (0, 0.55, True)  # below the abstention threshold


def test_a_decision_threshold_needs_two_classes(tmp_path: Path) -> None:
    fields = {
        "task": "knee",
        "name": "k",
        "version": "1",
        "device_uid": "2.25.9",
        "classes": card_classes("knee"),
        "backbone": "orthonode_cnn",
        "input_size": 64,
        "channels": 1,
        "normalisation": "standardise",
        "decision_threshold": 0.3,
    }
    save_bundle(tmp_path / "k", build_backbone("orthonode_cnn", 6), fields)
    with pytest.raises(BundleError, match="two classes"):
        load_bundle(tmp_path / "k")


def test_mean_stacker_sharpens_agreeing_views() -> None:
    from dicom_node.infer import fuse
    from dicom_node.models.bundle import Stacker

    ap, lat = np.array([0.9, 0.1]), np.array([0.9, 0.1])
    plain = fuse({"AP": ap, "LAT": lat}, None)
    assert plain is not None and np.allclose(plain, [0.9, 0.1])
    sharpened = fuse({"AP": ap, "LAT": lat}, Stacker(kind="mean", temperature=0.5))
    # softmax(log 0.9 / 0.5, log 0.1 / 0.5) = 0.81 / (0.81 + 0.01)
    assert sharpened is not None and np.allclose(sharpened, [0.81 / 0.82, 0.01 / 0.82])
    with pytest.raises(ValueError, match="coefficients"):
        Stacker(kind="logistic")


def test_fit_stacker_prefers_a_calibrated_fusion_when_views_agree() -> None:
    from train.fusion import fit_stacker

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, size=90)
    per_view = []
    for label in labels:
        views = {}
        for view in ("AP", "LAT"):
            logits = rng.normal(0, 0.6, 3)
            logits[label] += 1.6  # each view right and fairly sure, independently
            views[view] = np.exp(logits) / np.exp(logits).sum()
        per_view.append(views)
    stacker, scores = fit_stacker(per_view, labels, ["AP", "LAT"], 3)
    # Independent agreeing views: the plain mean is under-confident and loses.
    assert scores["chosen"] != "mean" and stacker is not None
    assert scores[f"{scores['chosen']}_log_loss"] < scores["mean_log_loss"]
