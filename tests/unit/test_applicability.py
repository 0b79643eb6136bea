"""The applicability stage: image check, implant presence, out-of-distribution score, and what
the predictor, the pipeline, the assembler and the configuration do with them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.applicability import assess, load_image_checker, study_implant
from dicom_node.assemble import Assembler
from dicom_node.config import load_config
from dicom_node.domain import ImageCheck, InstanceRef, RoutedView
from dicom_node.errors import BundleError, ConfigError
from dicom_node.infer import Predictor
from dicom_node.models.bundle import load_bundle, sha256_file, update_card
from dicom_node.models.ood import Mahalanobis, OodSpec
from dicom_node.store import Spool
from dicom_node.tasks import builtin_task
from tests.conftest import make_set
from tests.factories import (
    FakeClock,
    fixed_image_check,
    instance_bytes,
    jobs_from_manifest,
    store_file,
    tiny_bundle,
)

KNEE = builtin_task("knee")
VIEW = RoutedView(InstanceRef("1.2.3", "", "1.2", "", Path("x.dcm")), "knee", "AP")


def check(anatomy: str = "knee", view: str = "AP", implant: float = 0.9) -> ImageCheck:
    return ImageCheck(anatomy, 0.95, view, 0.9, {"knee": implant, "hip": 0.01, "spine": 0.01})


@pytest.fixture(scope="module")
def card_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixed_image_check(tmp_path_factory.mktemp("check") / "ic")


def test_assess_asks_anatomy_then_view_then_implant_then_ood(card_dir: Path) -> None:
    card = load_image_checker(card_dir).card
    ood = OodSpec(sha256="0" * 64, threshold=10.0)
    assert assess(VIEW, KNEE, check(), card, 3.0, ood) is None
    wrong = assess(VIEW, KNEE, check(anatomy="hip", view="LAT", implant=0.0), card, 99.0, ood)
    assert wrong is not None and wrong.reason == "anatomy"
    assert "hip" in wrong.detail and "knee" in wrong.detail
    verdict = assess(VIEW, KNEE, check(view="LAT", implant=0.0), card, 99.0, ood)
    assert verdict is not None and verdict.reason == "view"
    verdict = assess(VIEW, KNEE, check(implant=0.2), card, 99.0, ood)
    assert verdict is not None and verdict.reason == "no-implant"
    assert verdict.detail == "implant probability 0.20 < 0.50"
    verdict = assess(VIEW, KNEE, check(), card, 11.0, ood)
    assert verdict is not None and verdict.reason == "out-of-distribution"
    # Without a check only the score is asked; without either, nothing.
    assert assess(VIEW, KNEE, None, None, 11.0, ood) is not None
    assert assess(VIEW, KNEE, None, None, None, None) is None


def test_the_study_pools_its_views_implant_evidence(card_dir: Path) -> None:
    """An anterior plate that half-looks like the implant on one view (0.6) is refused when
    the study's other view shows none at all (0.001); a view with the implant cut off (0.02)
    does not take down a study whose other view clearly shows it (0.999)."""
    card = load_image_checker(card_dir).card
    plate = [check(implant=0.001), check(view="LAT", implant=0.6)]
    pooled = study_implant(plate, KNEE)
    assert pooled is not None and pooled < 0.05
    lateral = RoutedView(VIEW.instance, "knee", "LAT")
    verdict = assess(lateral, KNEE, plate[1], card, None, None, study=pooled)
    assert verdict is not None and verdict.reason == "no-implant"
    assert "study's views together" in verdict.detail and "this view 0.60" in verdict.detail
    assert verdict.score == pooled
    cut = [check(implant=0.999), check(view="LAT", implant=0.02)]
    pooled = study_implant(cut, KNEE)
    assert pooled is not None and pooled > 0.5
    assert assess(VIEW, KNEE, cut[0], card, None, None, study=pooled) is None
    # One view, or views of another anatomy: nothing to pool.
    assert study_implant(plate[:1], KNEE) is None
    assert study_implant([check(implant=0.9), check(anatomy="hip", implant=0.0)], KNEE) is None


def test_an_unsure_image_check_does_not_contradict_the_tags(card_dir: Path) -> None:
    card = load_image_checker(card_dir).card
    unsure = ImageCheck("hip", 0.45, "LAT", 0.4, {"knee": 0.9})
    assert assess(VIEW, KNEE, unsure, card, None, None) is None


def test_a_task_without_anatomy_or_implant_head_is_not_judged_on_them(card_dir: Path) -> None:
    card = load_image_checker(card_dir).card
    site = KNEE.model_copy(update={"name": "knee-oa", "anatomy": None})
    assert assess(VIEW, site, check(anatomy="hip", implant=0.0), card, None, None) is None


def test_mahalanobis_scores_far_features_high_and_round_trips() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(200, 8, generator=generator)
    b = torch.randn(200, 8, generator=generator) + 6.0
    model = Mahalanobis.fit(torch.cat([a, b]), torch.tensor([0] * 200 + [1] * 200))
    near = model.score(torch.zeros(1, 8))[0]
    far = model.score(torch.full((1, 8), -12.0))[0]
    assert near < 20 < far
    again = Mahalanobis.from_state(model.state())
    assert np.allclose(again.score(torch.full((1, 8), -12.0)), far)


def test_image_check_bundle_is_verified(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"image-check.*routing\.image_check: off"):
        load_image_checker(tmp_path / "missing")
    path = fixed_image_check(tmp_path / "ic")
    (path / "model.pt").write_bytes((path / "model.pt").read_bytes() + b"x")
    with pytest.raises(BundleError, match="sha256"):
        load_image_checker(path)


def test_fixed_image_check_says_what_it_was_told(tmp_path: Path) -> None:
    checker = load_image_checker(fixed_image_check(tmp_path / "ic", anatomy="spine", view="LAT"))
    [seen] = checker.check([np.random.default_rng(0).random((80, 60), dtype=np.float32)])
    assert (seen.anatomy, seen.view) == ("spine", "LAT")
    assert seen.implant["knee"] == pytest.approx(0.99, abs=1e-3)
    specs = {"knee": KNEE, "spine": builtin_task("spine")}
    assert checker.route(seen, specs, ["knee", "spine"]) == ("spine", "LAT")
    assert checker.route(seen, specs, ["knee"]) is None


@pytest.fixture(scope="module")
def knee_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_set(tmp_path_factory.mktemp("knee"), "k", task="knee", patients=2, seed=11)


def _predict(tmp_path: Path, knee_set: Path, **check: object) -> list:
    bundle = tiny_bundle(tmp_path / "b", "knee", backbone="orthonode_cnn")
    checker = load_image_checker(fixed_image_check(tmp_path / "ic", **check))  # type: ignore[arg-type]
    predictor = Predictor({"knee": bundle}, image_checker=checker)
    return predictor.predict(jobs_from_manifest(knee_set, "knee"))


def test_predictor_answers_on_the_views_the_image_check_confirms(
    tmp_path: Path, knee_set: Path
) -> None:
    """The check says "knee AP" of every image: the AP is analysed, the lateral is refused
    (the image contradicts its route), and the result is the AP's alone."""
    for prediction, views in _predict(tmp_path, knee_set):
        assert prediction.applicable
        assert [v.view.view for v in prediction.views] == ["AP"]
        [excluded] = prediction.not_applicable
        assert (excluded.view.view, excluded.reason) == ("LAT", "view")
        assert [v.view.view for v in views] == ["AP", "LAT"]  # analysed, then excluded
        assert prediction.fused_probabilities is None
        assert prediction.probabilities == prediction.views[0].probabilities


def test_predictor_refuses_a_hip_routed_as_knee(tmp_path: Path, knee_set: Path) -> None:
    results = _predict(tmp_path, knee_set, anatomy="hip")
    for prediction, views in results:
        assert not prediction.applicable
        assert {n.reason for n in prediction.not_applicable} == {"anatomy"}
        assert len(views) == 2  # kept for the SR's references
        assert prediction.fused_probabilities is None
        with pytest.raises(ValueError):
            _ = prediction.probabilities


def test_predictor_refuses_a_knee_without_implant(tmp_path: Path, knee_set: Path) -> None:
    for prediction, _ in _predict(tmp_path, knee_set, implant={"knee": 0.05}):
        assert not prediction.applicable
        reasons = {n.view.view: n.reason for n in prediction.not_applicable}
        assert reasons == {"AP": "no-implant", "LAT": "view"}


def test_out_of_distribution_score_from_the_bundle_card(tmp_path: Path, knee_set: Path) -> None:
    bundle = tiny_bundle(tmp_path / "b", "knee", backbone="orthonode_cnn")
    features = torch.randn(50, 256)
    model = Mahalanobis.fit(features, torch.tensor([0, 1] * 25))
    torch.save(model.state(), tmp_path / "b" / "ood.pt")
    spec = {"file": "ood.pt", "sha256": sha256_file(tmp_path / "b" / "ood.pt"), "threshold": -1}
    update_card(tmp_path / "b", {"ood": spec})
    bundle = load_bundle(tmp_path / "b")
    assert bundle.ood is not None
    jobs = jobs_from_manifest(knee_set, "knee")
    [(refused, _), *_] = Predictor({"knee": bundle}).predict(jobs)
    assert {n.reason for n in refused.not_applicable} == {"out-of-distribution"}
    [(answered, _), *_] = Predictor({"knee": bundle}, out_of_distribution=False).predict(jobs)
    assert answered.applicable
    (tmp_path / "b" / "ood.pt").write_bytes(b"changed")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(tmp_path / "b")


def test_fallback_routes_by_the_image_when_tags_are_missing(tmp_path: Path) -> None:
    hip = make_set(tmp_path, "h", task="hip", patients=1, seed=5)
    clock = FakeClock()
    spool = Spool(tmp_path / "spool", clock=clock)
    seen: list[str] = []

    def image_route(instance: InstanceRef) -> tuple[str, str] | None:
        seen.append(instance.sop_instance_uid)
        return ("hip", "AP")

    rules = load_config(None).routing.rules
    assembler = Assembler(spool, rules, {"hip": ("AP",)}, 10.0, clock, image_route=image_route)
    [(_, ds)] = instance_bytes(hip)
    del ds.BodyPartExamined
    del ds.ViewPosition
    store_file(spool, ds_bytes(ds), ds)
    assembler.route_new()
    assert seen == [ds.SOPInstanceUID]
    assert assembler.promote() == 1
    [job] = spool.claim_ready(8)
    assert (job.task, [v.view for v in job.views]) == ("hip", ["AP"])


def ds_bytes(ds: object) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)  # type: ignore[attr-defined]
    return buffer.getvalue()


def test_routing_configuration(tmp_path: Path) -> None:
    config = load_config(None)
    assert config.routing.image_check == "confirm"
    assert config.outputs.when_not_applicable == "report"
    legacy = tmp_path / "legacy.yaml"
    legacy.write_text("routing:\n  - {task: knee, body_part: [KNEE]}\n")
    assert [r.task for r in load_config(legacy).routing.rules] == ["knee"]
    current = tmp_path / "current.yaml"
    current.write_text(
        "routing:\n  image_check: fallback\n  image_check_bundle: ic\n"
        "  rules:\n    - {task: hip, body_part: [HIP]}\noutputs: {when_not_applicable: skip}\n"
    )
    config = load_config(current)
    assert config.routing.image_check == "fallback"
    assert config.routing.image_check_bundle == tmp_path / "ic"
    assert config.outputs.when_not_applicable == "skip"
    bad = tmp_path / "bad.yaml"
    bad.write_text("routing: {image_check: maybe}\n")
    with pytest.raises(ConfigError, match=r"routing\.image_check"):
        load_config(bad)


def test_shipped_image_check_card_has_its_validation_figures() -> None:
    card = json.loads((Path(__file__).parents[2] / "weights/image-check/card.json").read_text())
    assert set(card["implant_thresholds"]) == {"knee", "hip", "spine"}
    for task in ("knee", "hip", "spine"):
        figures = card["metrics"]["implant"][task]
        assert figures["sensitivity"] >= 0.99
        assert 0.0 < figures["threshold"] <= 0.5
