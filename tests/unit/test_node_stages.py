"""Unit tests of the node's stages: config, routing, spool, assembly, bundles, fusion, backoff."""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from dicom_node.assemble import Assembler, is_ready, latest_views
from dicom_node.config import RoutingRule, SendConfig, load_config, parse_ae_address
from dicom_node.domain import InstanceRef, RoutedView
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


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


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
    with pytest.raises(ConfigError, match="elbow"):
        load_config(path)


def test_shipped_conf_yaml_is_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    config = load_config(root / "conf.yaml")
    assert config.node.ae_title and config.tasks


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
    rules = load_config(None).routing
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
def _instance_bytes(folder: Path) -> list[tuple[bytes, pydicom.Dataset]]:
    with (folder / "manifest.csv").open() as handle:
        paths = [folder / r["path"] for r in csv.DictReader(handle)]
    return [(p.read_bytes(), pydicom.dcmread(p, stop_before_pixels=True)) for p in paths]


def _store(spool: Spool, data: bytes, ds: pydicom.Dataset) -> bool:
    return spool.store(
        data,
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        calling_ae_title="TEST",
    )


def test_spool_stores_durably_and_idempotently(tmp_path: Path) -> None:
    folder = make_set(tmp_path, "k", task="knee", patients=1, seed=1)
    spool = Spool(tmp_path / "spool")
    (data, ds), _ = _instance_bytes(folder)
    assert _store(spool, data, ds) is True
    assert _store(spool, data, ds) is False
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
    items = _instance_bytes(folder) * 3  # every instance three times, from several threads
    results: list[bool] = []
    lock = threading.Lock()

    def worker(chunk: list[tuple[bytes, pydicom.Dataset]]) -> None:
        for data, ds in chunk:
            new = _store(spool, data, ds)
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
def test_is_ready() -> None:
    assert is_ready("knee", {"AP", "LAT"}, 100.0, 100.0, 10.0)
    assert not is_ready("knee", {"AP"}, 100.0, 105.0, 10.0)
    assert is_ready("knee", {"AP"}, 100.0, 110.0, 10.0)
    assert is_ready("hip", {"AP"}, 100.0, 100.0, 10.0)
    assert not is_ready("spine", set(), 0.0, 1e9, 10.0)


def test_latest_views_keeps_the_last_of_each_view() -> None:
    def view(uid: str, name: str) -> RoutedView:
        ref = InstanceRef(uid, "1.2", "9.9", "9.8", Path(uid))
        return RoutedView(ref, "knee", name)

    chosen = latest_views([view("1", "LAT"), view("2", "AP"), view("3", "LAT")])
    assert [v.instance.sop_instance_uid for v in chosen] == ["2", "3"]


def test_assembler_routes_and_promotes(tmp_path: Path) -> None:
    knee = make_set(tmp_path, "k", task="knee", patients=1, seed=3)
    chest = make_set(tmp_path, "h", task="hip", patients=1, seed=3)
    clock = FakeClock()
    spool = Spool(tmp_path / "spool", clock=clock)
    unmatched = []
    rules = [r for r in load_config(None).routing if r.task == "knee"]
    assembler = Assembler(
        spool, rules, {"knee"}, 10.0, clock, on_unmatched=lambda: unmatched.append(1)
    )
    (ap_bytes, ap), (lat_bytes, lat) = _instance_bytes(knee)
    _store(spool, ap_bytes, ap)
    [(hip_bytes, hip)] = _instance_bytes(chest)
    _store(spool, hip_bytes, hip)
    assert assembler.route_new() == 2
    assert len(unmatched) == 1  # the hip matches no knee rule: ignored, counted
    assert assembler.promote_ready() == []  # AP only, not quiet long enough
    _store(spool, lat_bytes, lat)
    assembler.route_new()
    [job] = assembler.promote_ready()
    assert job.task == "knee" and [v.view for v in job.views] == ["AP", "LAT"]
    assert job.views[0].laterality in ("R", "L")
    assert spool.studies_in("ready")[0].study_instance_uid == ap.StudyInstanceUID
    # Processed, then another instance arrives: a new version is collected.
    spool.set_study_state(ap.StudyInstanceUID, "knee", "done")
    copy = pydicom.dcmread(knee / "dicom" / ap.PatientID / "01_AP.dcm")
    copy.SOPInstanceUID = pydicom.uid.generate_uid()
    path = tmp_path / "again.dcm"
    copy.save_as(path)
    _store(spool, path.read_bytes(), copy)
    assembler.route_new()
    [job2] = assembler.promote_ready()
    assert job2.version == 2
    assert job2.views[0].instance.sop_instance_uid == copy.SOPInstanceUID


def test_assembler_quiet_period(tmp_path: Path) -> None:
    knee = make_set(tmp_path, "k", task="knee", patients=1, seed=4)
    clock = FakeClock()
    spool = Spool(tmp_path / "spool", clock=clock)
    assembler = Assembler(spool, load_config(None).routing, {"knee"}, 10.0, clock)
    (ap_bytes, ap), _ = _instance_bytes(knee)
    _store(spool, ap_bytes, ap)
    assembler.route_new()
    clock.now += 9.9
    assert assembler.promote_ready() == []
    clock.now += 0.2
    [job] = assembler.promote_ready()
    assert [v.view for v in job.views] == ["AP"]


def test_resume_requeues_interrupted_jobs(tmp_path: Path) -> None:
    knee = make_set(tmp_path, "k", task="hip", patients=1, seed=4)
    spool = Spool(tmp_path / "spool")
    [(data, ds)] = _instance_bytes(knee)
    _store(spool, data, ds)
    Assembler(spool, load_config(None).routing, {"hip"}, 10.0, spool._clock).route_new()
    spool.set_study_state(ds.StudyInstanceUID, "hip", "processing")
    spool.close()
    reopened = Spool(tmp_path / "spool")
    assert reopened.resume() == 1
    assert [s.state for s in reopened.recent_studies()] == ["ready"]


# -- outbox --------------------------------------------------------------------------------
def test_backoff_grows_and_gives_up() -> None:
    policy = SendConfig(max_attempts=4, backoff_initial_s=5, backoff_max_s=12)
    assert [backoff_delay(n, policy) for n in (1, 2, 3, 4)] == [5.0, 10.0, 12.0, None]


def test_outbox_retry_and_dead_letter(tmp_path: Path) -> None:
    clock = FakeClock()
    spool = Spool(tmp_path / "spool", clock=clock)
    spool.enqueue("1.2.3", "knee", [tmp_path / "a.dcm", tmp_path / "b.dcm"], ["pacs"])
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
    torch.manual_seed(1)
    save_bundle(
        tmp_path / "b",
        build_backbone("mobilenet_v3_small", 2),
        _card(temperature=2.0, threshold=0.9),
    )
    bundle = load_bundle(tmp_path / "b")
    folder = make_set(tmp_path, "h", task="hip", patients=2, seed=5)
    with (folder / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    from dicom_node.domain import StudyJob

    jobs = []
    for row in rows:
        ref = InstanceRef(
            row["sop_instance_uid"],
            "1.2",
            row["study_instance_uid"],
            row["series_instance_uid"],
            folder / row["path"],
        )
        jobs.append(StudyJob(row["study_instance_uid"], "hip", (RoutedView(ref, "hip", "AP"),)))
    results = Predictor({"hip": bundle}).predict(jobs)
    assert len(results) == 2
    for (prediction, views), row in zip(results, rows, strict=True):
        assert prediction.study_instance_uid == row["study_instance_uid"]
        ds = pydicom.dcmread(folder / row["path"])
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
    """The inference worker isolates a study that breaks, marks it failed, finishes the rest."""
    from dicom_node.metrics import Metrics
    from dicom_node.service import Service

    clock = FakeClock()
    spool = Spool(tmp_path / "spool", clock=clock)
    folder = make_set(tmp_path, "h", task="hip", patients=3, seed=8)
    for data, ds in _instance_bytes(folder):
        _store(spool, data, ds)
    assembler = Assembler(spool, load_config(None).routing, {"hip"}, 10.0, clock)
    assembler.route_new()
    ready = assembler.promote_ready()
    assert len(ready) == 3
    bad = ready[1].study_instance_uid

    class Pipeline:
        def run(self, jobs: list[object]) -> list[object]:
            if any(j.study_instance_uid == bad for j in jobs):  # type: ignore[attr-defined]
                raise RuntimeError("PatientName 'PHANTOM^HIP' is not allowed")
            return []

    service = Service(load_config(None, base=tmp_path))
    service.spool, service.assembler, service.metrics = spool, assembler, Metrics()
    service.pipeline = Pipeline()  # type: ignore[assignment]
    service._infer_loop()
    states = {s.study_instance_uid: s for s in spool.recent_studies()}
    assert states[bad].state == "failed"
    assert "PHANTOM" not in (states[bad].error or "")  # no identifiers in the stored reason
    assert "RuntimeError" in (states[bad].error or "")
    assert sorted(s.state for s in states.values()) == ["done", "done", "failed"]
