"""The Orthanc plugin (deploy/orthanc/orthonode_forward.py) routes exactly as the node does.

The plugin runs inside Orthanc's embedded Python, so it carries a copy of dicom_node/route.py's
matching; these tests compare the copy with the node's own code on the same tags, and check the
plugin's forwarding bookkeeping (dedup, node outputs, retries) against a fake Orthanc.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from dicom_node import route as node_route
from dicom_node.config import Config, RoutingRule

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "deploy" / "orthanc" / "orthonode_forward.py"
SITE_CONFIG = ROOT / "deploy" / "orthanc" / "orthanc.json"


def _load_plugin() -> ModuleType:
    spec = importlib.util.spec_from_file_location("orthonode_forward", PLUGIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["orthonode_forward"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


plugin = _load_plugin()

NODE_RULES = list(Config().routing.rules)  # the node's defaults (one rule per built-in task)
EXTRA_RULES = [
    RoutingRule(task="knee", modality=[], body_part=["knee joint"], series_description=r"\bSTAND"),
    RoutingRule(task="hip", modality=["cr"], body_part=["Pelvis"]),
    RoutingRule(task="spine", body_part=["L-SPINE"], series_description="lumbar|LS"),
]


def _plugin_rules(rules: list[RoutingRule]) -> list[dict[str, Any]]:
    return plugin.parse_rules([r.model_dump() for r in rules])


def _node_task(tags: dict[str, Any], rules: list[RoutingRule]) -> str | None:
    decision = node_route.route(tags, rules)
    return decision.task if decision else None


def test_tables_are_the_nodes() -> None:
    assert plugin._BODY_PARTS == node_route._BODY_PARTS
    assert plugin._FRONTAL == node_route._FRONTAL
    assert plugin._LATERAL == node_route._LATERAL


def test_default_rules_are_the_nodes_defaults() -> None:
    assert plugin.parse_rules(plugin.DEFAULT_RULES) == _plugin_rules(NODE_RULES)
    assert plugin.Settings().rules == _plugin_rules(NODE_RULES)


def test_shipped_site_config_rules_are_the_nodes_defaults() -> None:
    config = json.loads(SITE_CONFIG.read_text())
    settings = plugin.load_settings(config)
    assert settings.rules == _plugin_rules(NODE_RULES)
    assert settings.modality in config["DicomModalities"]
    assert settings.dicomweb_server in config["DicomWeb"]["Servers"]
    assert config["DicomModalities"]["orthonode"] == ["ORTHONODE", "orthonode", 11112]
    assert config["PythonScript"].endswith("/orthonode_forward.py")


BODY_PARTS = [
    "KNEE",
    "knee",
    " Knee ",
    "KNEE JOINT",
    "knee-joint",
    "HIP",
    "hip joint",
    "PELVIS",
    "pelvis ",
    "LSPINE",
    "L-SPINE",
    "l spine",
    "LUMBAR SPINE",
    "Spine, lumbar",
    "LUMBOSACRAL",
    "LS-SPINE",
    "CHEST",
    "SPINE",
    "",
    None,
]
VIEWS = ["AP", "pa", "LAT", "ll", "R-L", "X-TABLE", "lateral", "OBLIQUE", "", None]
DESCRIPTIONS = ["", None, "KNEE LAT", "AP standing", "lumbar AP", "LS LAT", "STANDING", "CHEST PA"]


@pytest.mark.parametrize("value", [*BODY_PARTS, "HIPJOINT", "Lumbar", 12])
def test_body_part_normalisation_agrees(value: object) -> None:
    assert plugin.normalise_body_part(value) == node_route.normalise_body_part(value)


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("description", DESCRIPTIONS)
def test_view_normalisation_agrees(view: object, description: object) -> None:
    assert plugin.normalise_view(view, description) == node_route.normalise_view(view, description)


def _cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    for modality in ["DX", "CR", "cr", "SR", "OT", "CT", "", None]:
        for body_part in BODY_PARTS:
            for view in ["AP", "lat", "", None]:
                cases.append(
                    {"Modality": modality, "BodyPartExamined": body_part, "ViewPosition": view}
                )
    for description in DESCRIPTIONS:
        for protocol in ["", "STANDING KNEE", "LUMBAR", None]:
            cases.append(
                {
                    "Modality": "DX",
                    "BodyPartExamined": "knee joint",
                    "ViewPosition": "",
                    "SeriesDescription": description,
                    "ProtocolName": protocol,
                }
            )
            cases.append(
                {
                    "Modality": "CR",
                    "BodyPartExamined": "L-SPINE",
                    "SeriesDescription": description,
                    "ProtocolName": protocol,
                }
            )
    cases.append({})  # every tag missing
    cases.append({"Modality": "DX", "ViewPosition": "AP"})  # no BodyPartExamined
    cases.append({"BodyPartExamined": "KNEE", "ViewPosition": "AP"})  # no Modality
    return cases


@pytest.mark.parametrize("rules", [NODE_RULES, EXTRA_RULES], ids=["node-defaults", "site-rules"])
def test_routing_agrees_on_every_case(rules: list[RoutingRule]) -> None:
    mine = _plugin_rules(rules)
    disagreements = [
        tags for tags in _cases() if plugin.route_task(tags, mine) != _node_task(tags, rules)
    ]
    assert disagreements == []


@pytest.mark.parametrize(
    ("tags", "task"),
    [
        ({"Modality": "DX", "BodyPartExamined": "KNEE", "ViewPosition": "AP"}, "knee"),
        ({"Modality": "CR", "BodyPartExamined": " knee joint ", "ViewPosition": "LL"}, "knee"),
        ({"Modality": "DX", "BodyPartExamined": "pelvis", "ViewPosition": "AP"}, "hip"),
        ({"Modality": "DX", "BodyPartExamined": "l-spine", "SeriesDescription": "LAT"}, "spine"),
        ({"Modality": "DX", "BodyPartExamined": "KNEE"}, None),  # no view
        ({"Modality": "DX", "BodyPartExamined": "CHEST", "ViewPosition": "PA"}, None),
        ({"Modality": "SR", "BodyPartExamined": "KNEE", "ViewPosition": "AP"}, None),
        ({"Modality": "OT", "BodyPartExamined": "KNEE", "ViewPosition": "AP"}, None),
        ({"Modality": "CT", "BodyPartExamined": "KNEE", "ViewPosition": "AP"}, None),
        ({}, None),
    ],
)
def test_known_decisions(tags: dict[str, Any], task: str | None) -> None:
    assert plugin.route_task(tags, plugin.Settings().rules) == task
    assert _node_task(tags, NODE_RULES) == task


@pytest.mark.parametrize(
    ("tags", "metadata", "expected"),
    [
        ({"Modality": "DX", "BodyPartExamined": "KNEE", "ViewPosition": "AP"}, {}, "forward"),
        (
            {"Modality": "DX", "BodyPartExamined": "KNEE", "ViewPosition": "AP"},
            {"OrthonodeForwarded": "2026-01-01T00:00:00Z"},
            "forwarded",
        ),
        (  # the node's Secondary Capture, even if someone gave it DX and a view
            {
                "Modality": "DX",
                "BodyPartExamined": "KNEE",
                "ViewPosition": "AP",
                "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7",
            },
            {},
            "output",
        ),
        ({"Modality": "SR", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.34"}, {}, "output"),
        ({"Modality": "OT", "BodyPartExamined": "KNEE", "ViewPosition": "AP"}, {}, "output"),
        (  # whatever the node stores into Orthanc
            {"Modality": "DX", "BodyPartExamined": "KNEE", "ViewPosition": "AP"},
            {"RemoteAET": "ORTHONODE"},
            "output",
        ),
        ({"Modality": "DX", "BodyPartExamined": "CHEST", "ViewPosition": "PA"}, {}, "unmatched"),
        (  # DX For Presentation is not a Secondary Capture (1.1.7 is a prefix of 1.1.77...)
            {
                "Modality": "DX",
                "BodyPartExamined": "HIP",
                "ViewPosition": "AP",
                "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1",
            },
            {"RemoteAET": "MODALITY"},
            "forward",
        ),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.77.1.1"}, {}, "unmatched"),
    ],
)
def test_decide(tags: dict[str, Any], metadata: dict[str, Any], expected: str) -> None:
    assert plugin.decide(tags, metadata, plugin.Settings(), "ORTHONODE") == expected


def test_bad_settings_are_refused() -> None:
    base = {"UserMetadata": {"OrthonodeForwarded": 4301}}
    assert plugin.load_settings(base).modality == "orthonode"
    for section, words in [
        ({"Rules": []}, "non-empty"),
        ({"Rules": [{"task": "knee"}]}, "body_part"),
        ({"Rules": [{"task": "Knee!", "body_part": ["KNEE"]}]}, "task"),
        ({"Rules": [{"task": "knee", "body_part": ["KNEE"], "bodypart": 1}]}, "unknown"),
        (
            {"Rules": [{"task": "knee", "body_part": ["KNEE"], "series_description": "("}]},
            "series_description",
        ),
        ({"Transport": "ftp"}, "Transport"),
        ({"Modalty": "x"}, "unknown"),
        ({"RetryIntervalSeconds": 0}, "Retry"),
    ]:
        with pytest.raises(ValueError) as caught:
            plugin.load_settings({**base, "Orthonode": section})
        assert words in str(caught.value), (section, caught.value)
    with pytest.raises(ValueError, match="UserMetadata"):
        plugin.load_settings({})


# --- The forwarder against a fake Orthanc ---------------------------------------------------


class Unknown(Exception):
    pass


class FakeOrthanc:
    """Studies → series → instances with tags and metadata; a store that can be made to fail."""

    def __init__(self) -> None:
        self.instances: dict[str, dict[str, Any]] = {}  # id -> {"tags", "metadata", "series"}
        self.series: dict[str, dict[str, Any]] = {}
        self.studies: dict[str, dict[str, Any]] = {}
        self.properties: dict[int, str] = {}
        self.stored: list[str] = []
        self.node_up = True
        self.logs: list[tuple[str, str]] = []
        self.changes: list[dict[str, Any]] = []
        self.unstable: set[str] = set()
        self.updates: dict[str, int] = {}  # study -> its LastUpdate (a counter here)

    def add(self, study: str, series: str, instance: str, tags: dict[str, Any], **metadata: Any):
        self.studies.setdefault(study, {"uid": "1.2.3." + study, "series": []})
        if series not in self.series:
            self.series[series] = {"modality": tags.get("Modality", ""), "instances": []}
            self.studies[study]["series"].append(series)
        self.series[series]["instances"].append(instance)
        self.instances[instance] = {
            "tags": {"SOPInstanceUID": "1.2.3.9." + instance, **tags},
            "metadata": dict(metadata),
            "study": study,
        }
        self.updates[study] = self.updates.get(study, 0) + 1
        self.changes.append({"ChangeType": "NewInstance", "ID": instance, "Seq": 0})
        self.changes[-1]["Seq"] = len(self.changes)

    def _study(self, study_id: str) -> dict[str, Any]:
        if study_id not in self.studies:
            raise Unknown(17, "Unknown resource")
        study = self.studies[study_id]
        return {
            "ID": study_id,
            "IsStable": study_id not in self.unstable,
            "LastUpdate": str(self.updates[study_id]),
            "MainDicomTags": {"StudyInstanceUID": study["uid"]},
            "Series": study["series"],
        }

    def get(self, uri: str) -> Any:
        path, _, query = uri.partition("?")
        parts = path.strip("/").split("/")
        if parts[0] == "modalities":
            return {"orthonode": {"AET": "ORTHONODE"}}
        if parts[0] == "changes":
            if query == "last":
                return {"Changes": self.changes[-1:], "Done": True, "Last": len(self.changes)}
            options = dict(item.split("=") for item in query.split("&"))
            since, limit = int(options["since"]), int(options["limit"])
            page = self.changes[since : since + limit]
            done = since + limit >= len(self.changes)
            return {"Changes": page, "Done": done, "Last": page[-1]["Seq"] if page else since}
        if parts[0] == "studies":
            return self._study(parts[1])
        if parts[0] == "instances" and parts[2] == "study":
            return self._study(self.instances[parts[1]]["study"])
        if parts[0] == "series":
            series = self.series[parts[1]]
            return {
                "MainDicomTags": {"Modality": series["modality"]},
                "Instances": series["instances"],
            }
        instance = self.instances[parts[1]]
        return dict(instance["metadata"] if parts[2] == "metadata" else instance["tags"])

    def post(self, uri: str, body: dict[str, Any]) -> Any:
        assert uri == "/modalities/orthonode/store"
        assert body["Synchronous"] is True
        if not self.node_up:
            raise RuntimeError(9, "Error in the network protocol")
        self.stored.extend(body["Resources"])
        return {}

    def put(self, uri: str, body: str) -> None:
        parts = uri.strip("/").split("/")
        self.instances[parts[1]]["metadata"][parts[3]] = body

    def get_property(self, number: int) -> str:
        return self.properties.get(number, "")

    def set_property(self, number: int, value: str) -> None:
        self.properties[number] = value

    def is_unknown(self, error: Exception) -> bool:
        return isinstance(error, Unknown)

    def log(self, level: str, message: str) -> None:
        self.logs.append((level, message))


KNEE_AP = {"Modality": "DX", "BodyPartExamined": "KNEE", "ViewPosition": "AP"}
KNEE_LAT = {"Modality": "DX", "BodyPartExamined": "knee", "ViewPosition": "LAT"}


def _forwarder(fake: FakeOrthanc, now: list[float]) -> Any:
    settings = plugin.Settings(retry_interval_s=5, retry_max_interval_s=20)
    return plugin.Forwarder(fake, settings, clock=lambda: now[0])


def test_forwards_matching_originals_once_and_never_outputs() -> None:
    fake, now = FakeOrthanc(), [0.0]
    fake.add("s1", "ser1", "ap", KNEE_AP, RemoteAET="MODALITY")
    fake.add("s1", "ser2", "lat", KNEE_LAT, RemoteAET="MODALITY")
    fake.add("s1", "ser3", "chest", {**KNEE_AP, "BodyPartExamined": "CHEST"})
    forwarder = _forwarder(fake, now)
    forwarder.submit("s1")
    forwarder.run_once()
    assert sorted(fake.stored) == ["ap", "lat"]
    assert all("OrthonodeForwarded" in fake.instances[i]["metadata"] for i in ("ap", "lat"))
    assert "OrthonodeForwarded" not in fake.instances["chest"]["metadata"]
    # The node's results arrive; the study becomes stable again: nothing more is sent.
    fake.add("s1", "ser9001", "sr", {"Modality": "SR"}, RemoteAET="ORTHONODE")
    fake.add("s1", "ser9002", "sc", {"Modality": "OT"}, RemoteAET="ORTHONODE")
    forwarder.submit("s1")
    forwarder.run_once()
    assert sorted(fake.stored) == ["ap", "lat"]
    # A late third original is sent alone.
    fake.add("s1", "ser4", "ap2", {**KNEE_AP, "ViewPosition": "PA"})
    forwarder.submit("s1")
    forwarder.run_once()
    assert sorted(fake.stored) == ["ap", "ap2", "lat"]
    assert not any("PATIENT" in message.upper() for _, message in fake.logs)
    assert json.loads(fake.properties[7301])["pending"] == {}


def test_failed_send_is_kept_retried_with_backoff_and_survives_a_restart() -> None:
    fake, now = FakeOrthanc(), [0.0]
    fake.add("s1", "ser1", "ap", KNEE_AP)
    fake.node_up = False
    forwarder = _forwarder(fake, now)
    forwarder.submit("s1")
    forwarder.run_once()
    assert fake.stored == []
    assert any("failed" in m and "will retry" in m for _, m in fake.logs)
    assert json.loads(fake.properties[7301])["pending"] == {"s1": 1}
    assert forwarder._next_retry == 5
    now[0] = 5
    forwarder.run_once()  # the retry fails again: the next waits twice as long
    assert forwarder._next_retry == 15
    # Orthanc restarts: a new forwarder reads the pending list and retries at once.
    fake.node_up = True
    again = _forwarder(fake, now)
    again._load_state()
    again._next_retry = now[0]
    again.run_once()
    assert fake.stored == ["ap"]
    assert json.loads(fake.properties[7301])["pending"] == {}
    assert again._next_retry is None


def test_deleted_study_is_dropped_and_give_up_after_max_attempts() -> None:
    fake, now = FakeOrthanc(), [0.0]
    forwarder = _forwarder(fake, now)
    forwarder.submit("gone")
    forwarder.run_once()
    assert json.loads(fake.properties[7301])["pending"] == {}
    fake.add("s2", "ser1", "ap", KNEE_AP)
    fake.node_up = False
    limited = plugin.Forwarder(
        fake, plugin.Settings(retry_interval_s=1, max_attempts=2), clock=lambda: now[0]
    )
    limited.submit("s2")
    limited.run_once()
    now[0] = 10
    limited.run_once()
    assert json.loads(fake.properties[7301])["pending"] == {}
    assert any(level == "error" and "giving up" in m for level, m in fake.logs)


def _state(fake: FakeOrthanc) -> dict[str, Any]:
    return dict(json.loads(fake.properties[7301]))


def test_sweep_starts_at_now_and_catches_stable_events_lost_in_a_restart() -> None:
    fake, now = FakeOrthanc(), [0.0]
    fake.add("old", "ser0", "old-ap", KNEE_AP)  # in the archive before the plugin existed
    first = _forwarder(fake, now)
    first._load_state()
    first._next_sweep = 0
    first.run_once()
    assert fake.stored == []  # the archive is not forwarded
    assert _state(fake)["checkpoint"] == 1
    # A study arrives; Orthanc stops before it becomes stable: no STABLE_STUDY, ever.
    fake.add("s1", "ser1", "ap", KNEE_AP)
    fake.add("s1", "ser2", "lat", KNEE_LAT)
    fake.unstable.add("s1")
    now[0] = 60
    first.run_once()  # a periodic sweep: s1 still receiving, the checkpoint waits before it
    assert fake.stored == [] and _state(fake)["checkpoint"] == 1
    fake.unstable.discard("s1")  # after the restart Orthanc calls every study stable
    again = _forwarder(fake, now)
    again._load_state()
    again._next_sweep = now[0]
    again.run_once()
    assert sorted(fake.stored) == ["ap", "lat"]
    assert _state(fake) == {"checkpoint": 3, "pending": {}}


def test_sweep_leaves_studies_already_looked_at() -> None:
    fake, now = FakeOrthanc(), [0.0]
    forwarder = _forwarder(fake, now)
    forwarder._load_state()
    forwarder._next_sweep = 0
    forwarder.run_once()  # checkpoint 0
    fake.add("s1", "ser1", "ap", KNEE_AP)
    forwarder.submit("s1")
    forwarder.run_once()  # the stable event: sent
    fake.node_up = False  # were it looked at again, the sweep would log a failure
    now[0] = 60
    forwarder.run_once()
    assert fake.stored == ["ap"]
    assert _state(fake) == {"checkpoint": 1, "pending": {}}
    assert not [m for _, m in fake.logs if "failed" in m or "nothing" in m]
