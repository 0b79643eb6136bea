"""Unit tests of the node's stages: config, routing, spool, assembly, bundles, fusion, backoff."""

from __future__ import annotations

import csv
import json
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from dicom_node.assemble import Assembler
from dicom_node.config import RoutingRule, SendConfig, load_config, parse_ae_address
from dicom_node.domain import InstanceRef, Outputs, RoutedView, StudyJob, latest_indices
from dicom_node.errors import BundleError, ConfigError, StorageFullError, StoreError
from dicom_node.infer import Predictor, fuse
from dicom_node.models.backbones import build_backbone
from dicom_node.models.bundle import Stacker, load_bundle, save_bundle
from dicom_node.models.codes import card_classes
from dicom_node.preprocess import heatmap_to_source, resize_pad, to_model_input
from dicom_node.route import normalise_body_part, normalise_view, route
from dicom_node.send import backoff_delay
from dicom_node.store import Spool
from tests.conftest import make_set
from tests.factories import (
    FakeClock,
    instance_bytes,
    jobs_from_manifest,
    queue_outputs,
    resend,
    store_file,
    tiny_bundle,
)


# -- config --------------------------------------------------------------------------------
def test_empty_config_is_a_working_default(tmp_path: Path) -> None:
    config = load_config(None, base=tmp_path)
    assert config.node.ae_title == "ORTHONODE" and config.node.port == 11112
    assert set(config.tasks) == {"knee", "hip", "spine"}
    assert config.tasks["knee"].bundle == tmp_path / "weights" / "knee"
    assert config.peers == [] and config.destinations == []


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "conf.yaml"
    path.write_text("node:\n  ae_title: THIS_TITLE_IS_TOO_LONG\n  port: 70000\nbogus: 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "node.ae_title" in message and "1-16" in message
    assert "node.port" in message and "bogus" in message


def test_config_rejects_invalid_yaml_and_unknown_tasks(tmp_path: Path) -> None:
    path = tmp_path / "conf.yaml"
    path.write_text("node: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    path.write_text("tasks:\n  elbow:\n    bundle: weights/elbow\n")
    with pytest.raises(ConfigError, match=r"elbow.*spec"):
        load_config(path)
    path.write_text("tasks:\n  Knee OA:\n    bundle: weights/x\n")
    with pytest.raises(ConfigError, match="lower-case letters"):
        load_config(path)
    path.write_text("routing:\n  - {task: elbow, body_part: [ELBOW]}\n")
    with pytest.raises(ConfigError, match="elbow"):
        load_config(path)


def test_routing_defaults_come_from_the_task_specs(tmp_path: Path) -> None:
    from dicom_node.tasks import builtin_tasks

    config = load_config(None, base=tmp_path)
    assert [(r.task, r.body_part) for r in config.routing.rules] == [
        (name, spec.routing.body_part) for name, spec in builtin_tasks().items()
    ]
    path = tmp_path / "conf.yaml"
    path.write_text("tasks:\n  hip: {bundle: weights/hip, enabled: false}\n")
    assert [r.task for r in load_config(path).routing.rules] == []


def test_shipped_conf_yaml_is_valid() -> None:
    """The shipped file parses, and what it sets is what it says (not just the defaults)."""
    root = Path(__file__).resolve().parents[2]
    text = (root / "conf.yaml").read_text()
    config = load_config(root / "conf.yaml")
    for key, value in (
        ("ae_title", config.node.ae_title),
        ("port", config.node.port),
        ("http_port", config.node.http_port),
        ("max_associations", config.node.max_associations),
        ("min_free_mb", config.spool.min_free_mb),
        ("stable_after_s", config.assembly.stable_after_s),
        ("max_attempts", config.send.max_attempts),
    ):
        rendered = f"{value:g}" if isinstance(value, float) else str(value)
        assert f"{key}: {rendered}" in text, key
    assert {name: task.bundle for name, task in config.tasks.items()} == {
        name: root / "weights" / name for name in ("knee", "hip", "spine")
    }
    assert config.spool.directory == root / "spool"  # relative to the file


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "conf.yaml"
    path.write_text("node:\n  ae_title: FROMFILE\n  port: 104\n")
    monkeypatch.setenv("ORTHONODE_NODE__AE_TITLE", "FROMENV")
    monkeypatch.setenv("ORTHONODE_SPOOL__MIN_FREE_MB", "7")
    config = load_config(path)
    assert config.node.ae_title == "FROMENV" and config.node.port == 104
    assert config.spool.min_free_mb == 7
    monkeypatch.setenv("ORTHONODE_NODE__PORT", "not-a-port")
    with pytest.raises(ConfigError, match=r"node\.port"):
        load_config(path)


def test_parse_ae_address() -> None:
    destination = parse_ae_address("PACS@127.0.0.1:4242")
    assert (destination.ae_title, destination.host, destination.port) == ("PACS", "127.0.0.1", 4242)
    for bad in ("PACS@host", "@host:1", "A" * 17 + "@h:1", "PACS@h:99999"):
        with pytest.raises(ConfigError):
            parse_ae_address(bad)


# -- routing -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("L-SPINE", "LSPINE"),
        ("lumbar spine", "LSPINE"),
        ("LSPINE", "LSPINE"),
        ("Knee", "KNEE"),
        ("HIP JOINT", "HIP"),
        ("CHEST", None),
        (None, None),
    ],
)
def test_normalise_body_part(value: object, expected: str | None) -> None:
    assert normalise_body_part(value) == expected


@pytest.mark.parametrize(
    ("position", "description", "expected"),
    [
        ("AP", "", "AP"),
        ("PA", "", "AP"),
        ("LL", "", "LAT"),
        ("RL", "", "LAT"),
        ("LAT", "", "LAT"),
        ("LATERAL", "", "LAT"),
        ("", "KNEE LAT", "LAT"),
        ("", "knee ap", "AP"),
        ("", "", None),
        ("OBL", "oblique", None),
    ],
)
def test_normalise_view(position: str, description: str, expected: str | None) -> None:
    assert normalise_view(position, description) == expected


def test_route_rules() -> None:
    rules = load_config(None).routing.rules
    knee = {
        "Modality": "DX",
        "BodyPartExamined": "KNEE",
        "ViewPosition": "LL",
        "ImageLaterality": "R",
    }
    assert route(knee, rules) == route({**knee, "ViewPosition": "LAT"}, rules)
    decision = route(knee, rules)
    assert decision is not None and (decision.task, decision.view, decision.laterality) == (
        "knee",
        "LAT",
        "R",
    )
    assert route({**knee, "BodyPartExamined": "CHEST"}, rules) is None
    assert route({**knee, "Modality": "CT"}, rules) is None
    spine = route(
        {
            "Modality": "CR",
            "BodyPartExamined": "L-SPINE",
            "ViewPosition": "AP",
            "ImageLaterality": "U",
        },
        rules,
    )
    assert spine is not None and spine.task == "spine" and spine.laterality is None
    only_protocol = [RoutingRule(task="hip", body_part=["HIP"], series_description="^THR")]
    hip = {"Modality": "DX", "BodyPartExamined": "HIP", "ViewPosition": "AP"}
    assert route({**hip, "SeriesDescription": "THR follow-up"}, only_protocol) is not None
    assert route({**hip, "SeriesDescription": "trauma"}, only_protocol) is None


# -- spool ---------------------------------------------------------------------------------
def test_spool_stores_durably_and_idempotently(tmp_path: Path) -> None:
    folder = make_set(tmp_path, "k", task="knee", patients=1, seed=1)
    spool = Spool(tmp_path / "spool")
    (data, ds), _ = instance_bytes(folder)
    assert store_file(spool, data, ds) is True
    assert store_file(spool, data, ds) is False
    [ref] = spool.unrouted()
    assert ref.path.read_bytes() == data
    assert ref.path.name == f"{ds.SOPInstanceUID}.dcm" and spool.root in ref.path.parents
    assert not list(ref.path.parent.glob("*.tmp"))
    spool.close()
    reopened = Spool(tmp_path / "spool")
    assert [r.sop_instance_uid for r in reopened.unrouted()] == [ds.SOPInstanceUID]


def test_spool_refuses_bad_uids_and_full_disks(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(StoreError):
        spool.store(
            b"x",
            sop_class_uid="1.2",
            sop_instance_uid="../../etc/passwd",
            study_instance_uid="1.2",
            series_instance_uid="1.3",
        )
    full = Spool(tmp_path / "spool2", min_free_bytes=1 << 60)
    with pytest.raises(StorageFullError):
        full.store(
            b"x",
            sop_class_uid="1.2",
            sop_instance_uid="1.2.3",
            study_instance_uid="1.2",
            series_instance_uid="1.3",
        )


def test_spool_concurrent_stores(tmp_path: Path) -> None:
    folder = make_set(tmp_path, "s", task="spine", patients=3, seed=2)
    spool = Spool(tmp_path / "spool")
    items = instance_bytes(folder) * 3  # every instance three times, from several threads
    results: list[bool] = []
    lock = threading.Lock()

    def worker(chunk: list[tuple[bytes, pydicom.Dataset]]) -> None:
        for data, ds in chunk:
            new = store_file(spool, data, ds)
            with lock:
                results.append(new)

    threads = [threading.Thread(target=worker, args=(items[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(results) == 6 and len(results) == 18
    assert len(spool.unrouted()) == 6


# -- assembly ------------------------------------------------------------------------------
def test_latest_indices_pick_the_last_image_of_each_view() -> None:
    def view(uid: str, name: str) -> RoutedView:
        ref = InstanceRef(uid, "1.2", "9.9", "9.8", Path(uid))
        return RoutedView(ref, "knee", name)

    views = (view("1", "AP"), view("2", "LAT"), view("3", "LAT"))
    assert latest_indices(views) == (0, 2)
    assert latest_indices(views[:1]) == (0,)


KNEE_VIEWS = {"knee": ("AP", "LAT")}


def test_assembler_routes_and_promotes(tmp_path: Path) -> None:
    knee = make_set(tmp_path, "k", task="knee", patients=1, seed=3)
    chest = make_set(tmp_path, "h", task="hip", patients=1, seed=3)
    clock = FakeClock()
    spool = Spool(tmp_path / "spool", clock=clock)
    unmatched = []
    rules = [r for r in load_config(None).routing.rules if r.task == "knee"]
    assembler = Assembler(
        spool, rules, KNEE_VIEWS, 10.0, clock, on_unmatched=lambda: unmatched.append(1)
    )
    (ap_bytes, ap), (lat_bytes, lat) = instance_bytes(knee)
    store_file(spool, ap_bytes, ap)
    [(hip_bytes, hip)] = instance_bytes(chest)
    store_file(spool, hip_bytes, hip)
    assert assembler.route_new() == 2
    assert len(unmatched) == 1  # the hip matches no knee rule: ignored, counted
    assert assembler.promote() == 0  # AP only, not quiet long enough
    assert spool.claim_ready(8) == []
    store_file(spool, lat_bytes, lat)
    assembler.route_new()
    assert assembler.promote() == 1
    [job] = spool.claim_ready(8)
    assert job.task == "knee" and [v.view for v in job.views] == ["AP", "LAT"]
    assert job.views[0].laterality in ("R", "L")
    assert spool.study(ap.StudyInstanceUID, "knee").state == "processing"  # type: ignore[union-attr]
    assert spool.claim_ready(8) == []  # claimed once
    assert spool.complete(job, [tmp_path / "sr.dcm"], ["pacs"])
    # Processed, then another AP arrives: a new version with every image.
    copy = resend(spool, knee / "dicom" / ap.PatientID / "01_AP.dcm")
    assembler.route_new()
    assert assembler.promote() == 1
    [job2] = spool.claim_ready(8)
    assert job2.version == 2
    assert [v.instance.sop_instance_uid for v in job2.views] == [
        ap.SOPInstanceUID,
        copy.SOPInstanceUID,
        lat.SOPInstanceUID,
    ]
    assert latest_indices(job2.views) == (1, 2)


def test_assembler_quiet_period(tmp_path: Path) -> None:
    knee = make_set(tmp_path, "k", task="knee", patients=1, seed=4)
    clock = FakeClock()
    spool = Spool(tmp_path / "spool", clock=clock)
    assembler = Assembler(spool, load_config(None).routing.rules, KNEE_VIEWS, 10.0, clock)
    (ap_bytes, ap), _ = instance_bytes(knee)
    store_file(spool, ap_bytes, ap)
    assembler.route_new()
    clock.now += 9.9
    assert assembler.seconds_to_next_deadline() == pytest.approx(0.1)
    assert assembler.promote() == 0
    clock.now += 0.2
    assert assembler.promote() == 1
    [job] = spool.claim_ready(8)
    assert [v.view for v in job.views] == ["AP"]
    assert assembler.seconds_to_next_deadline() is None


def test_required_views_come_from_the_bundle(tmp_path: Path) -> None:
    """A knee bundle trained on AP alone makes an AP-only knee study ready at once."""
    knee = make_set(tmp_path, "k", task="knee", patients=1, seed=4)
    clock = FakeClock()
    spool = Spool(tmp_path / "spool", clock=clock)
    assembler = Assembler(spool, load_config(None).routing.rules, {"knee": ("AP",)}, 10.0, clock)
    (ap_bytes, ap), _ = instance_bytes(knee)
    store_file(spool, ap_bytes, ap)
    assembler.route_new()
    assert assembler.promote() == 1


def _ready_knee_study(
    tmp_path: Path, knee: Path
) -> tuple[FakeClock, Spool, Assembler, pydicom.Dataset, pydicom.Dataset]:
    """A phantom knee study's AP + LAT stored, routed and promoted to ready."""
    clock = FakeClock()
    spool = Spool(tmp_path / "spool", clock=clock)
    assembler = Assembler(spool, load_config(None).routing.rules, KNEE_VIEWS, 10.0, clock)
    (ap_bytes, ap), (lat_bytes, lat) = instance_bytes(knee)
    store_file(spool, ap_bytes, ap)
    store_file(spool, lat_bytes, lat)
    assembler.route_new()
    assert assembler.promote() == 1
    return clock, spool, assembler, ap, lat


def test_late_instance_while_processing_opens_a_new_version(tmp_path: Path) -> None:
    """The old race, step by step: AP + LAT claimed, a second LAT routed while processing.

    Before the fix, ``mark_routed`` only bumped the study's time and the completion of
    version 1 succeeded, so the second LAT was acknowledged and never analysed.
    """
    knee = make_set(tmp_path, "k", task="knee", patients=1, seed=6)
    clock, spool, assembler, ap, lat = _ready_knee_study(tmp_path, knee)
    [job1] = spool.claim_ready(8)
    assert job1.version == 1 and len(job1.views) == 2
    # ... the inference worker is busy with job1; the second LAT is stored and routed.
    clock.now += 0.3
    late = resend(spool, knee / "dicom" / ap.PatientID / "02_LAT.dcm")
    assembler.route_new()
    study = spool.study(ap.StudyInstanceUID, "knee")
    assert study is not None and (study.state, study.version) == ("collecting", 2)
    # Version 1 finishes: its completion is refused and queues nothing.
    assert not spool.complete(job1, [tmp_path / "v1-sr.dcm"], ["pacs"])
    assert spool.due() == []
    assert not spool.fail(job1, "too late to fail either")
    assert assembler.promote() == 1
    [job2] = spool.claim_ready(8)
    assert job2.version == 2
    assert {v.instance.sop_instance_uid for v in job2.views} == {
        ap.SOPInstanceUID,
        lat.SOPInstanceUID,
        late.SOPInstanceUID,
    }
    assert spool.complete(job2, [tmp_path / "v2-sr.dcm"], ["pacs"])
    assert [item.path.name for item in spool.due()] == ["v2-sr.dcm"]
    assert spool.study(ap.StudyInstanceUID, "knee").state == "done"  # type: ignore[union-attr]


def test_outputs_are_queued_once_and_only_for_the_current_version(tmp_path: Path) -> None:
    knee = make_set(tmp_path, "k", task="knee", patients=1, seed=8)
    _, spool, assembler, ap, _ = _ready_knee_study(tmp_path, knee)
    [job] = spool.claim_ready(8)
    outputs = [tmp_path / "sr.dcm", tmp_path / "sc1.dcm"]
    assert spool.complete(job, outputs, ["pacs", "archive"])
    assert spool.study(ap.StudyInstanceUID, "knee").state == "done"  # type: ignore[union-attr]
    assert spool.resume() == 0  # done is done
    # The same files queued again (a re-run after a crash makes the same files): once each.
    resend(spool, knee / "dicom" / ap.PatientID / "02_LAT.dcm")
    assembler.route_new()
    assert spool.promote_ready({"knee": {"AP"}}, quiet_since=0.0) == 1
    [rerun] = spool.claim_ready(8)
    assert spool.complete(rerun, outputs, ["pacs", "archive"])
    assert sorted((i.destination, i.path.name) for i in spool.due()) == [
        ("archive", "sc1.dcm"),
        ("archive", "sr.dcm"),
        ("pacs", "sc1.dcm"),
        ("pacs", "sr.dcm"),
    ]
    resend(spool, knee / "dicom" / ap.PatientID / "02_LAT.dcm")
    assembler.route_new()  # version 2 opens: version 1 may queue nothing more
    assert not spool.complete(job, [tmp_path / "sr-again.dcm"], ["pacs"])
    assert len(spool.due()) == 4


def test_an_instance_for_a_ready_study_joins_its_job(tmp_path: Path) -> None:
    knee = make_set(tmp_path, "k", task="knee", patients=1, seed=7)
    _, spool, assembler, ap, _ = _ready_knee_study(tmp_path, knee)
    resend(spool, knee / "dicom" / ap.PatientID / "02_LAT.dcm")
    assembler.route_new()  # the study is 'ready', not yet claimed: same version
    [job] = spool.claim_ready(8)
    assert job.version == 1 and len(job.views) == 3


def test_resume_requeues_interrupted_jobs(tmp_path: Path) -> None:
    knee = make_set(tmp_path, "k", task="hip", patients=1, seed=4)
    spool = Spool(tmp_path / "spool")
    [(data, ds)] = instance_bytes(knee)
    store_file(spool, data, ds)
    assembler = Assembler(
        spool, load_config(None).routing.rules, {"hip": ("AP",)}, 10.0, spool._clock
    )
    assembler.route_new()
    assembler.promote()
    [job] = spool.claim_ready(8)
    spool.close()
    reopened = Spool(tmp_path / "spool")
    assert reopened.resume() == 1
    assert [s.state for s in reopened.recent_studies()] == ["ready"]
    [again] = reopened.claim_ready(8)
    assert again == job


# -- outbox --------------------------------------------------------------------------------
def test_backoff_grows_and_gives_up() -> None:
    policy = SendConfig(max_attempts=4, backoff_initial_s=5, backoff_max_s=12)
    assert [backoff_delay(n, policy) for n in (1, 2, 3, 4)] == [5.0, 10.0, 12.0, None]


def test_outbox_retry_and_dead_letter(tmp_path: Path) -> None:
    clock = FakeClock()
    spool = Spool(tmp_path / "spool", clock=clock)
    queue_outputs(spool, "1.2.3", [tmp_path / "a.dcm", tmp_path / "b.dcm"], ["pacs"])
    first, second = spool.due()
    spool.mark_sent(first.id)
    spool.mark_failed(second.id, "refused", retry_in_s=30)
    assert spool.due() == []
    clock.now += 31
    [again] = spool.due()
    assert again.attempts == 1 and again.last_error == "refused"
    spool.mark_failed(again.id, "refused", retry_in_s=None)
    assert [d.id for d in spool.dead_letters()] == [second.id]
    assert spool.outbox_counts() == {"sent": 1, "dead": 1}
    assert spool.retry_dead() == 1 and len(spool.due()) == 1


# -- bundles, inference ---------------------------------------------------------------------
def _card(task: str = "hip", **extra: object) -> dict[str, object]:
    classes = card_classes(task)
    return {
        "task": task,
        "name": f"test {task}",
        "version": "0.0.1-test",
        "device_uid": "2.25.1",
        "classes": classes,
        "backbone": "mobilenet_v3_small",
        "input_size": 64,
        **extra,
    }


def test_bundle_round_trip_and_sha256(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_backbone("mobilenet_v3_small", 2)
    card = save_bundle(tmp_path / "b", model, _card())
    bundle = load_bundle(tmp_path / "b")
    assert bundle.card == card and len(bundle.classes) == 2
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    assert torch.allclose(bundle.model(x), model(x), atol=1e-5)
    weights = tmp_path / "b" / "model.pt"
    weights.write_bytes(weights.read_bytes() + b"tampered")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(tmp_path / "b")


def test_bundle_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"card\.json is missing"):
        load_bundle(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "card.json").write_text(json.dumps({"task": "hip"}))
    with pytest.raises(BundleError, match="not a valid card"):
        load_bundle(tmp_path / "bad")


def test_fuse_mean_and_stacker() -> None:
    ap, lat = np.array([0.7, 0.3]), np.array([0.4, 0.6])
    assert fuse({"AP": ap}, None) is None
    assert np.allclose(fuse({"AP": ap, "LAT": lat}, None), [0.55, 0.45])
    # A stacker that only trusts the lateral view reproduces it.
    stacker = Stacker(coefficients=[[0, 0, 1, 0], [0, 0, 0, 1]], intercepts=[0, 0])
    assert np.allclose(fuse({"AP": ap, "LAT": lat}, stacker), lat)


def test_predictor_matches_the_model_and_batches(tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path / "b", "hip", seed=1, temperature=2.0, threshold=0.9)
    folder = make_set(tmp_path, "h", task="hip", patients=2, seed=5)
    jobs = jobs_from_manifest(folder, "hip")
    results = Predictor({"hip": bundle}).predict(jobs)
    assert len(results) == 2
    for (prediction, views), job in zip(results, jobs, strict=True):
        assert prediction.study_instance_uid == job.study_instance_uid
        ds = pydicom.dcmread(job.views[0].instance.path)
        from dicom_node.preprocess import display_image

        x = to_model_input(display_image(ds), 64)[None]
        with torch.no_grad():
            expected = torch.softmax(bundle.model(x) / 2.0, dim=1)[0].numpy()
        assert np.allclose(prediction.probabilities, expected, atol=1e-5)
        assert prediction.fused_probabilities is None
        assert prediction.abstained == (max(expected) < 0.9)
        assert views[0].display.shape == (256, 256)


def test_resize_pad_and_back() -> None:
    image = np.zeros((300, 150), dtype=np.float32)
    image[100:200, 50:100] = 1.0
    square = resize_pad(image, 100)
    assert square.shape == (100, 100)
    assert square[:, :20].max() == 0.0  # padding left and right
    back = heatmap_to_source(square, 300, 150)
    assert back.shape == (300, 150)
    assert back[150, 75] > 0.9 and back[20, 20] < 0.1


@pytest.mark.parametrize("method", ["gradcam", "integrated-gradients"])
def test_explain_maps_saliency_to_the_source_grid(tmp_path: Path, method: str) -> None:
    from dicom_node.domain import StudyJob
    from dicom_node.explain import METHODS, explain

    torch.manual_seed(2)
    save_bundle(
        tmp_path / "b",
        build_backbone("orthonode_cnn", 2),
        _card(backbone="orthonode_cnn", channels=1, normalisation="standardise"),
    )
    bundle = load_bundle(tmp_path / "b")
    folder = make_set(tmp_path, "h", task="hip", patients=1, seed=5, rows=300, cols=200)
    with (folder / "manifest.csv").open() as handle:
        row = next(csv.DictReader(handle))
    ref = InstanceRef(
        row["sop_instance_uid"],
        "1.2",
        row["study_instance_uid"],
        row["series_instance_uid"],
        folder / row["path"],
    )
    job = StudyJob(row["study_instance_uid"], "hip", (RoutedView(ref, "hip", "AP"),))
    [(prediction, [view])] = Predictor({"hip": bundle}).predict([job])
    explanation = explain(bundle, view, prediction.predicted_index, method)
    assert explanation.heatmap.shape == (300, 200)
    assert explanation.heatmap.min() >= 0.0 and explanation.heatmap.max() <= 1.0
    assert explanation.method == METHODS[method]
    assert explanation.view == view.view


def test_a_failing_study_does_not_fail_the_batch(tmp_path: Path) -> None:
    """The pipeline isolates a study that breaks, marks it failed, finishes the rest."""
    from dicom_node.pipeline import Pipeline

    clock = FakeClock()
    spool = Spool(tmp_path / "spool", clock=clock)
    folder = make_set(tmp_path, "h", task="hip", patients=3, seed=8)
    for data, ds in instance_bytes(folder):
        store_file(spool, data, ds)
    assembler = Assembler(spool, load_config(None).routing.rules, {"hip": ("AP",)}, 10.0, clock)
    assembler.route_new()
    assert assembler.promote() == 3
    jobs = spool.claim_ready(8)
    bad = jobs[1].study_instance_uid
    runs: list[int] = []
    failed: list[str] = []

    class Failing(Pipeline):
        def run(self, jobs: Sequence[StudyJob]) -> list[Outputs]:
            runs.append(len(jobs))
            if any(j.study_instance_uid == bad for j in jobs):
                raise RuntimeError("PatientName 'PHANTOM^HIP' is not allowed")
            for job in jobs:
                assert self.spool.complete(job, [], [])
            return [Outputs(j.study_instance_uid, j.task, Path("sr.dcm"), ()) for j in jobs]

    pipeline = Failing(
        predictor=None,  # type: ignore[arg-type]
        spool=spool,
        specs={},
        destinations=[],
        build_structured_report=lambda *a, **k: None,  # type: ignore[arg-type,return-value]
        build_secondary_capture=lambda *a, **k: None,  # type: ignore[arg-type,return-value]
        on_failed=failed.append,
    )
    outputs = pipeline.process(jobs)
    assert runs == [3, 1, 1, 1]  # the batch, then one by one
    assert sorted(o.study_instance_uid for o in outputs) == sorted(
        j.study_instance_uid for j in jobs if j.study_instance_uid != bad
    )
    states = {s.study_instance_uid: s for s in spool.recent_studies()}
    assert states[bad].state == "failed" and failed == ["hip"]
    assert "PHANTOM" not in (states[bad].error or "")  # no identifiers in the stored reason
    assert "RuntimeError" in (states[bad].error or "")
    assert sorted(s.state for s in states.values()) == ["done", "done", "failed"]
