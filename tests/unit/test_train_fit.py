"""python -m train fit: splits, data formats, augmentation, and a tiny train → bundle → node
loads → predicts run (with and without the region-of-interest stage)."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.domain import InstanceRef, RoutedView, StudyJob
from dicom_node.infer import Predictor
from dicom_node.models.bundle import device_uid, load_bundle
from tests.conftest import make_set
from train.__main__ import main as train_main
from train.data import kfold_patients, read_dataset, split_patients
from train.engine import augment_batch
from train.metrics import expected_calibration_error


def test_split_is_patient_level_stratified_and_deterministic() -> None:
    patients = [f"p{i}" for i in range(60)]
    labels = [i % 3 for i in range(60)]
    first = split_patients(patients, labels, (0.7, 0.2, 0.1), seed=1)
    assert first == split_patients(patients, labels, (0.7, 0.2, 0.1), seed=1)
    assert first != split_patients(patients, labels, (0.7, 0.2, 0.1), seed=2)
    for name, expected in (("train", 42), ("val", 12), ("test", 6)):
        members = [p for p, s in first.items() if s == name]
        assert len(members) == expected
        assert sorted(labels[int(p[1:])] for p in members).count(0) == expected // 3


def test_ece_matches_a_hand_computation() -> None:
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 0])
    # bins (0.8,0.867]: {0.8 wrong}; (0.867,0.933]: {0.9 right}; (0.667,0.733]: {0.7 right};
    # (0.533,0.6]: {0.6 right}
    expected = (abs(0 - 0.8) + abs(1 - 0.9) + abs(1 - 0.7) + abs(1 - 0.6)) / 4
    assert expected_calibration_error(probabilities, labels) == pytest.approx(expected)
    perfect = np.eye(2)[labels]
    assert expected_calibration_error(perfect, labels) == pytest.approx(0.0)


def test_kfold_covers_every_patient_once_as_test() -> None:
    patients = [f"p{i}" for i in range(50)]
    labels = [i % 2 for i in range(50)]
    tested = []
    for fold in range(5):
        split = kfold_patients(patients, labels, 5, fold, 0.2, seed=3)
        test = [p for p, s in split.items() if s == "test"]
        assert len(test) == 10 and sum(labels[int(p[1:])] for p in test) == 5
        assert sum(s == "val" for s in split.values()) == 8
        tested += test
    assert sorted(tested) == sorted(patients)
    with pytest.raises(ValueError, match="fold 5"):
        kfold_patients(patients, labels, 5, 5, 0.2, seed=3)


def test_augmentation_keeps_shape_statistics_and_moves_masks_with_the_image() -> None:
    generator = torch.Generator().manual_seed(0)
    batch = torch.zeros(4, 1, 64, 64)
    batch[:, :, 16:40, 8:32] = 5.0
    targets = (torch.nn.functional.avg_pool2d(batch, 8) > 2.5).float()  # 3 × 3 cells
    batch = (batch - batch.mean()) / batch.std()
    out, moved = augment_batch(batch, generator, targets)
    assert out.shape == batch.shape and not torch.allclose(out, batch)
    # Intensity changes keep each image's mean and spread (the normalisation stays valid).
    assert torch.allclose(out.mean(dim=(1, 2, 3)), batch.mean(dim=(1, 2, 3)), atol=1e-4)
    assert torch.allclose(out.std(dim=(1, 2, 3)), batch.std(dim=(1, 2, 3)), atol=1e-3)
    assert moved is not None and moved.shape == targets.shape
    # The moved mask still sits on the bright square of each augmented image.
    for image, mask in zip(out, moved, strict=True):
        cells = torch.nn.functional.avg_pool2d(image[None], 8)[0]
        assert mask.sum() > 0
        assert cells[mask > 0].mean() > cells[mask == 0].mean()


def test_labels_csv_over_a_dicom_folder_matches_the_manifest(tmp_path: Path) -> None:
    data = make_set(tmp_path, "d", task="spine", patients=4, seed=8, rows=128, cols=128)
    with (data / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study_instance_uid", "label"])
        writer.writerows(sorted({(r["study_instance_uid"], r["label"]) for r in rows}))
    (data / "notes.txt").write_text("not DICOM")  # skipped, not an error
    from_labels = read_dataset(data / "dicom", labels)
    from_manifest = read_dataset(data)
    assert from_labels.task == "spine" and len(from_labels.samples) == len(rows) == 8

    def key(s: object) -> tuple[str, str, int]:
        return (s.sop_instance_uid, s.view, s.label_index)  # type: ignore[attr-defined]

    assert sorted(map(key, from_labels.samples)) == sorted(map(key, from_manifest.samples))
    bad = tmp_path / "bad.csv"
    bad.write_text("study_instance_uid,label\n" + rows[0]["study_instance_uid"] + ",Titanium\n")
    with pytest.raises(ValueError, match="not a spine class"):
        read_dataset(data / "dicom", bad)
    with pytest.raises(ValueError, match="--labels"):
        read_dataset(data / "dicom")


@pytest.mark.slow
@pytest.mark.parametrize("roi", ["off", "on"])
def test_tiny_train_bundle_load_predict(tmp_path: Path, roi: str) -> None:
    data = make_set(tmp_path, "data", task="knee", patients=30, seed=6, rows=192, cols=192)
    external = make_set(tmp_path, "ext", task="knee", patients=6, seed=7, rows=160, cols=192)
    out = tmp_path / "bundle"
    arguments = ["fit", "--data", str(data), "--out", str(out), "--size", "96"]
    arguments += ["--epochs", "2", "--roi-epochs", "2", "--roi-size", "128", "--roi", roi]
    arguments += ["--threads", "2", "--version", "0.0.1-test", "--split", "0.6", "0.2", "0.2"]
    arguments += ["--external", str(external), "--aug-noise", "0.4", "--aug-gamma", "0.3"]
    assert train_main(arguments) == 0
    bundle = load_bundle(out)
    card = json.loads((out / "card.json").read_text())
    assert card["task"] == "knee" and card["version"] == "0.0.1-test" and card["demo"] is True
    assert card["training"]["data_fingerprint"] and card["temperature"] > 0
    # The SR's Device UID follows the weights: another model, another UID.
    assert card["device_uid"] == device_uid("knee", "0.0.1-test", card["model_sha256"])
    assert card["training"]["command"].startswith("python -m train fit --data")
    # The commit the code ran from (this test runs inside the checkout; "-dirty" while edited).
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert card["training"]["git_commit"].removesuffix("-dirty") == head.strip()
    assert card["training"]["args"]["aug_noise"] == "0.4"  # the augmentation is on record
    assert card["training"]["args"]["aug_gamma"] == "0.3"
    assert set(card["metrics"]) >= {"AP", "LAT", "fused", "external:ext"}
    assert (card["roi"] is not None) == (roi == "on") == (bundle.localiser is not None)
    assert not list(out.glob("checkpoint*.pt"))
    report = (out / "report" / "report.md").read_text()
    assert "test fused" in report and "external ext fused" in report
    assert (out / "report" / "roc_test_fused.png").read_bytes()[:4] == b"\x89PNG"
    split = (out / "split.csv").read_text()
    assert "PH-KNEE" not in split  # UIDs only, never patient identifiers
    with (data / "manifest.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["patient_id"] == "PH-KNEE-S6-00000"]
    views = tuple(
        RoutedView(
            InstanceRef(r["sop_instance_uid"], "", r["study_instance_uid"], "", data / r["path"]),
            "knee",
            r["view"],
        )
        for r in rows
    )
    [(prediction, prepared)] = Predictor({"knee": bundle}).predict(
        [StudyJob(rows[0]["study_instance_uid"], "knee", views)]
    )
    assert len(prediction.probabilities) == 6
    assert prediction.fused_probabilities is not None
    assert abs(sum(prediction.probabilities) - 1.0) < 1e-6
    assert (prepared[0].region is not None) == (roi == "on")
    # evaluate goes through the node's Predictor; its fused accuracy must match a recount.
    from train.evaluate import to_markdown
    from train.predict import evaluate

    result = evaluate(out, data, saliency="gradcam")
    assert result["saliency"]["images"] == 60
    assert 0.0 <= result["saliency"]["mass_in_mask"] <= 1.0
    assert result["patients"] == 30 and result["sections"]["AP"]["n"] == 30
    assert list(result["sections"]) == ["AP", "LAT", "fused"]
    matrix = np.array(result["sections"]["fused"]["confusion"])
    assert matrix.sum() == 30
    assert result["sections"]["fused"]["accuracy"] == pytest.approx(np.trace(matrix) / 30, abs=1e-4)
    low, high = result["sections"]["fused"]["ci95"]["accuracy"]
    assert low <= result["sections"]["fused"]["accuracy"] <= high
    markdown = to_markdown(result, "held-out")
    assert "fused" in markdown and "Zimmer Persona" in markdown and "30 patients" in markdown


def test_saliency_in_mask() -> None:
    from train.predict import saliency_in_mask

    heat = np.zeros((10, 10))
    heat[2, 2], heat[7, 7] = 3.0, 1.0
    mask = np.zeros((10, 10), dtype=bool)
    mask[1:4, 1:4] = True
    assert saliency_in_mask(heat, mask) == (0.75, True)
    assert saliency_in_mask(heat, ~mask) == (0.25, False)
    assert saliency_in_mask(np.zeros((4, 4)), np.ones((4, 4), dtype=bool)) == (0.0, True)


def test_outside_share_counts_activation_outside_the_mask() -> None:
    from train.engine import outside_share

    features = torch.zeros(2, 3, 4, 4)
    features[0, :, 0, 0] = 1.0  # inside the mask
    features[0, :, 3, 3] = 3.0  # outside
    features[1, :, 1, 1] = 2.0  # inside
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, 0:4, 0:4] = 1.0  # the top-left quarter (2 × 2 cells at 4 × 4)
    # image 0: 3 of 4 units outside; image 1: none.
    assert float(outside_share(features, masks)) == pytest.approx((0.75 + 0.0) / 2)


def test_guidance_moves_activation_onto_the_mask() -> None:
    """A few steps with guidance lower the share of activation outside the mask."""
    from dicom_node.models.backbones import build_backbone, saliency_layer
    from train.engine import DistributedContext, Guidance, outside_share, train_one_epoch

    torch.manual_seed(0)
    model = build_backbone("orthonode_cnn16", 2)
    x = torch.randn(16, 1, 64, 64)
    y = torch.randint(0, 2, (16,))
    masks = torch.zeros(16, 1, 8, 8)
    masks[:, :, 2:5, 2:5] = 1.0
    layer = saliency_layer(model, "orthonode_cnn16")

    def share() -> float:
        model.eval()
        captured: list[torch.Tensor] = []
        hook = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
        with torch.no_grad():
            model(x)
        hook.remove()
        assert captured[0].shape[-1] == 4  # 1/16 of the input: the fine Grad-CAM grid
        return float(outside_share(captured[0], masks))

    before = share()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(15):
        train_one_epoch(
            model,
            x,
            y,
            torch.arange(16),
            loss_fn=torch.nn.functional.cross_entropy,
            optimiser=optimiser,
            schedule=None,
            batch_size=16,
            generator=torch.Generator().manual_seed(0),
            augmentation=None,
            context=DistributedContext(),
            guidance=Guidance(layer, masks, weight=5.0),
        )
    assert share() < before - 0.2


@pytest.mark.slow
def test_fit_trains_a_task_defined_in_conf_yaml(tmp_path: Path) -> None:
    """A site's own task (not built in): fit reads its classes and codes from --config."""
    import yaml

    data = make_set(tmp_path, "data", task="knee", patients=16, seed=8, rows=128, cols=128)
    manifest = data / "manifest.csv"
    with manifest.open() as handle:
        rows = list(csv.DictReader(handle))
    implants = sorted({r["label"] for r in rows})
    for row in rows:  # relabel the phantoms as a two-class site task
        row["task"] = "knee-two"
        row["label"] = "first half" if implants.index(row["label"]) < 3 else "second half"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    classes = [
        {"name": name, "code_value": code, "coding_scheme": "99MYSITE", "code_meaning": name}
        for name, code in (("first half", "HALF-1"), ("second half", "HALF-2"))
    ]
    spec = {
        "label": "Knee implant half",
        "finding": {"value": "40388003", "scheme": "SCT", "meaning": "Implant"},
        "site": {"value": "49076000", "scheme": "SCT", "meaning": "Knee joint"},
        "evaluation": {"value": "HALF", "scheme": "99MYSITE", "meaning": "Implant half"},
        "routing": {"body_part": ["KNEE"]},
        "classes": classes,
    }
    conf = tmp_path / "conf.yaml"
    conf.write_text(yaml.safe_dump({"tasks": {"knee-two": {"bundle": "b", "spec": spec}}}))
    out = tmp_path / "bundle"
    arguments = ["fit", "--data", str(data), "--out", str(out), "--config", str(conf)]
    arguments += ["--size", "64", "--epochs", "1", "--roi", "off", "--threads", "2"]
    arguments += ["--split", "0.5", "0.25", "0.25"]
    assert train_main(arguments) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["task"] == "knee-two"
    assert card["classes"] == classes
    # The bundle's card names the classes: evaluate needs no --config.
    assert train_main(["evaluate", "--bundle", str(out), "--data", str(data)]) == 0
    without = ["fit", "--data", str(data), "--out", str(tmp_path / "b2"), "--epochs", "1"]
    assert train_main(without) == 2  # not built in, and no --config: a clear error
