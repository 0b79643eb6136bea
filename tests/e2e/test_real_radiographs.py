"""Real radiographs without an implant: the node names no implant and calls no loosening.

The node's models are trained on synthetic phantoms only. Each real radiograph that a PyPI
package ships (:mod:`tests.real_radiographs`: a chest PA and a distal tibia AP, each in three
encodings, and a cat) is sent once per task with the tags that route it there (BodyPartExamined
KNEE, HIP or LSPINE; ViewPosition AP), each copy its own study, to a node running the shipped
configuration (``routing.image_check: confirm``) and the shipped weights, over real C-STORE
associations. Every SR that comes back must be a "not applicable" SR: the task's evaluation is
Not applicable (385432009, SCT), with a coded reason, and no class of the task (no implant
model, no screw brand, no loosening call: 52101004 / 272519000, SCT) anywhere in it. Then the
node must still answer a C-ECHO.

These files are test data only: never train on them or choose a threshold with them.

To see what the node does without its image check (environment overrides conf.yaml)::

    ORTHONODE_ROUTING__IMAGE_CHECK=off python -m pytest tests/e2e/test_real_radiographs.py
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid
from pynetdicom import AE

from dicom_node.config import load_config
from dicom_node.encode.common import NOT_APPLICABLE, NOT_APPLICABLE_REASON
from dicom_node.service import Service
from dicom_node.tasks import builtin_task
from tests.factories import RecordingPacs, free_port, wait_for
from tests.real_radiographs import RADIOGRAPHS, RealRadiograph, locate, require_package

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]

#: The tags that route a copy to each task (ViewPosition AP for all).
BODY_PART = {"knee": "KNEE", "hip": "HIP", "spine": "LSPINE"}

CASES = [(item, task) for item in RADIOGRAPHS for task in BODY_PART]
DEADLINE_S = 300.0  # for every study's outputs (21 studies, CPU)


def _case_id(item: RealRadiograph, task: str) -> str:
    return f"{item.name.removesuffix('.dcm')}-{task}"


@dataclass
class Outcome:
    """What became of one copy: its study's state at the node and the SRs the PACS got."""

    item: RealRadiograph
    task: str
    study_instance_uid: str
    state: str = "missing"
    error: str | None = None
    reports: list[Any] = field(default_factory=list)

    def reasons(self) -> list[str]:
        return sorted(
            {v for report in self.reports for v in _values(report, _key(NOT_APPLICABLE_REASON))}
        )

    def said(self) -> list[str]:
        """What each SR says as the task's evaluation (an implant model, Not applicable...)."""
        evaluation = builtin_task(self.task).evaluation
        return [
            meaning
            for report in self.reports
            for meaning in _values(report, _key(evaluation), meanings=True)
        ]

    def comments(self) -> list[str]:
        return [text for report in self.reports for text in _comments(report)]

    def line(self) -> str:
        detail = "; ".join(self.comments()) or self.error or ""
        return (
            f"{_case_id(self.item, self.task):14s} {self.state:6s} {len(self.reports)} SR "
            f"said={'/'.join(self.said()) or '-':24s} "
            f"reasons={','.join(self.reasons()) or '-':14s} {detail}"
        ).rstrip()


@dataclass(repr=False)
class Run:
    service: Service
    outcomes: dict[tuple[str, str], Outcome]

    def __repr__(self) -> str:
        return f"Run({len(self.outcomes)} copies)"

    def table(self) -> str:
        return "\n".join(outcome.line() for outcome in self.outcomes.values())


def _config_file(folder: Path, pacs: RecordingPacs) -> Path:
    """conf.yaml as a site writes it: the shipped weights and routing, this test's ports."""
    config = {
        "node": {"host": "127.0.0.1", "port": free_port(), "http_port": 0},
        "destinations": [
            {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}
        ],
        "spool": {"directory": str(folder / "spool"), "min_free_mb": 1},
        "assembly": {"stable_after_s": 0.5},  # one view per study: no partner to wait for
        "tasks": {task: {"bundle": str(ROOT / "weights" / task)} for task in BODY_PART},
        # The shipped image check mode (confirm) stays the default; only the path is anchored.
        "routing": {"image_check_bundle": str(ROOT / "weights" / "image-check")},
        "outputs": {"when_not_applicable": "report"},
        "inference": {"device": "cpu"},
        "send": {"backoff_initial_s": 0.2, "max_attempts": 3},
    }
    path = folder / "conf.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _copy_for(path: Path, task: str) -> pydicom.Dataset:
    """The file as its own study, with the tags that route it to ``task``."""
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.BodyPartExamined = BODY_PART[task]
    ds.ViewPosition = "AP"
    if ds.Modality not in ("CR", "DX"):
        ds.Modality = "CR"
    return ds


def _send(port: int, datasets: list[pydicom.Dataset]) -> list[int]:
    """C-STORE ``datasets`` over one association, each in its own transfer syntax."""
    ae = AE(ae_title="MODALITY")
    for context in sorted({(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}):
        ae.add_requested_context(*context)
    assoc = ae.associate("127.0.0.1", port, ae_title="ORTHONODE")
    assert assoc.is_established, "the node refused the association"
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """One node for the module; every copy sent in one association; every output waited for."""
    require_package()
    found = {item.name: locate(item) for item in RADIOGRAPHS}
    for item in RADIOGRAPHS:
        if item.required and found[item.name] is None:
            pytest.fail(f"{item.package} is installed but has no {item.name}")
    folder = tmp_path_factory.mktemp("real-radiographs")
    pacs = RecordingPacs()
    service: Service | None = None
    try:
        service = Service(load_config(_config_file(folder, pacs)), safety_net_s=5.0)
        service.start()
        outcomes: dict[tuple[str, str], Outcome] = {}
        datasets = []
        for item, task in CASES:
            path = found[item.name]
            if path is None:
                continue
            ds = _copy_for(path, task)
            datasets.append(ds)
            outcomes[item.name, task] = Outcome(item, task, ds.StudyInstanceUID)
        statuses = _send(service.scp.port, datasets)
        assert statuses == [0] * len(datasets), statuses
        spool = service.spool

        def settled() -> bool:
            for outcome in outcomes.values():
                state = spool.study(outcome.study_instance_uid, outcome.task)
                if state is not None:
                    outcome.state, outcome.error = state.state, state.error
            terminal = all(o.state in ("done", "failed") for o in outcomes.values())
            return terminal and spool.outbox_counts().get("pending", 0) == 0

        try:
            wait_for(settled, DEADLINE_S, "every study's outputs", every=0.2)
        except AssertionError as error:
            table = "\n".join(o.line() for o in outcomes.values())
            raise AssertionError(f"{error}\n{table}") from None
        for outcome in outcomes.values():
            outcome.reports = pacs.of_study(outcome.study_instance_uid, "SR")
        result = Run(service, outcomes)
        print(f"\nreal radiographs, per copy (image_check {service.config.routing.image_check}):")
        print(result.table())
        yield result
    finally:
        if service is not None:
            service.stop()
        pacs.stop()


@pytest.mark.parametrize("item", RADIOGRAPHS, ids=[r.name for r in RADIOGRAPHS])
def test_the_package_ships_what_the_list_says(item: RealRadiograph) -> None:
    """The header facts tests/real_radiographs.py records (a new package version could change
    or drop a file)."""
    if item.required:
        require_package(item.package)
    path = locate(item)
    if path is None:
        assert not item.required, f"{item.package} is installed but has no {item.name}"
        pytest.skip(f"{item.package} not installed (not a declared test dependency)")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    shipped = (
        ds.Modality,
        ds.PhotometricInterpretation,
        int(ds.BitsStored),
        int(ds.Rows),
        int(ds.Columns),
        ds.get("BodyPartExamined", ""),
        ds.file_meta.TransferSyntaxUID,
        int(ds.get("NumberOfFrames", 1) or 1),
    )
    listed = (
        item.modality,
        item.photometric,
        item.bits_stored,
        item.rows,
        item.columns,
        item.body_part,
        item.transfer_syntax,
        1,
    )
    assert shipped == listed


@pytest.mark.parametrize(
    ("item", "task"), CASES, ids=[_case_id(item, task) for item, task in CASES]
)
def test_names_no_implant(run: Run, item: RealRadiograph, task: str) -> None:
    outcome = run.outcomes.get((item.name, task))
    if outcome is None:
        pytest.skip(f"{item.package} not installed (not a declared test dependency)")
    spec = builtin_task(task)
    classes = {(c.code_value, c.coding_scheme) for c in spec.classes}
    context = f"{_case_id(item, task)} ({item.shows})\nevery copy:\n{run.table()}"
    assert outcome.state == "done", f"study {outcome.state}: {outcome.error}\n{context}"
    assert outcome.reports, f"no SR reached the PACS\n{context}"
    for report in outcome.reports:
        codes = _codes(report)
        named = sorted(codes & classes)
        assert not named, f"the SR names {named} (reasons {outcome.reasons()})\n{context}"
        evaluations = _values(report, (spec.evaluation.value, spec.evaluation.scheme))
        assert evaluations == [NOT_APPLICABLE.value], (
            f"{spec.evaluation.meaning}: {evaluations}, not [{NOT_APPLICABLE.value}] "
            f"(Not applicable)\n{context}"
        )
        assert _values(report, _key(NOT_APPLICABLE_REASON)), f"no coded reason\n{context}"


def test_the_node_is_still_healthy(run: Run) -> None:
    """After every real radiograph: a C-ECHO succeeds, and no study failed."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    assoc = ae.associate("127.0.0.1", run.service.scp.port, ae_title="ORTHONODE")
    assert assoc.is_established, "the node refused the association"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    assert status and int(status.Status) == 0x0000, status
    failed = [o.line() for o in run.outcomes.values() if o.state == "failed"]
    assert not failed, "\n".join(failed)


def _key(code: Any) -> tuple[str, str]:
    return code.value, code.scheme


def _items(items: Any) -> Iterator[Any]:
    for item in items or []:
        yield item
        yield from _items(item.get("ContentSequence"))


def _codes(report: pydicom.Dataset) -> set[tuple[str, str]]:
    """Every code in the content tree, as a concept name or as a value."""
    return {
        (code.CodeValue, code.CodingSchemeDesignator)
        for item in _items(report.ContentSequence)
        for keyword in ("ConceptNameCodeSequence", "ConceptCodeSequence")
        for code in item.get(keyword, [])
    }


def _values(report: pydicom.Dataset, name: tuple[str, str], meanings: bool = False) -> list[str]:
    """The code values (or meanings) of the CODE items whose concept name is ``name``."""
    return [
        str(value.CodeMeaning if meanings else value.CodeValue)
        for item in _items(report.ContentSequence)
        for concept in item.get("ConceptNameCodeSequence", [])
        if (concept.CodeValue, concept.CodingSchemeDesignator) == name
        for value in item.get("ConceptCodeSequence", [])
    ]


def _comments(report: pydicom.Dataset) -> list[str]:
    """The TEXT Comments (121106, DCM): what was measured on each image not answered on."""
    return [
        str(item.TextValue)
        for item in _items(report.ContentSequence)
        if item.get("ValueType") == "TEXT"
        and any(
            (c.CodeValue, c.CodingSchemeDesignator) == ("121106", "DCM")
            for c in item.get("ConceptNameCodeSequence", [])
        )
    ]
