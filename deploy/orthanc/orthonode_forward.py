"""orthonode_forward: an Orthanc Python plugin that sends stable studies to orthonode.

Load it with the orthanc-python plugin (``"PythonScript": "/etc/orthanc/orthonode_forward.py"``).
On each STABLE_STUDY it looks at the study's instances and forwards, by C-STORE to the
modality named in the ``Orthonode`` configuration section (or by STOW-RS to a DICOMweb server),
every instance that

- matches one of the routing rules (the node's own rules and normalisation, copied from
  dicom_node/route.py; tests/unit/test_orthanc_forward_rules.py keeps the two identical),
- is not one of the node's outputs (SR, Secondary Capture, Modality SR/OT, or received from
  the node's AE title), and
- was not forwarded before (the user metadata ``OrthonodeForwarded`` on the instance, written
  once the node has acknowledged it; Orthanc's index keeps it across restarts).

The node sends its SR and Secondary Captures back into the same Orthanc (its ``destinations``).

Sending is done by one worker thread, with ``"Synchronous": true``: the store's outcome is known
before an instance is marked as forwarded, Orthanc's change thread never waits for the network
(the plugin SDK warns against REST calls from the change callback), and one study is sent at a
time. A study whose send fails (node down, association refused, a C-STORE failure status) stays
in a pending list, kept in an Orthanc global property so that it survives a restart, and is
retried every ``RetryIntervalSeconds`` (doubling up to ``RetryMaxIntervalSeconds``) until it
succeeds or ``MaxAttempts`` (0: no limit) is reached. A study is put on that list as soon as
its stable event is taken up, so a study being processed when Orthanc stops is taken up again
after the restart. Orthanc does not emit STABLE_STUDY after a restart for a study that was
still receiving when it stopped; a sweep of Orthanc's change log (``/changes``, from a
checkpoint kept in the same global property; at startup and every ``SweepIntervalSeconds``)
takes such studies up. Delivery is at least once: if Orthanc stops between the node's
acknowledgement and the metadata write, the instance is sent again (the node keys instances by
SOP Instance UID).

Logs carry Orthanc identifiers and DICOM UIDs only, never patient names or IDs.

Standard library only (Orthanc's embedded Python may lack PyYAML). The pure parts (rules,
normalisation, the per-instance decision, the settings) import without the ``orthanc`` module.
"""

from __future__ import annotations

import datetime
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

try:  # only inside Orthanc (orthanc-python); absent when the tests import this file
    import orthanc  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the interpreter
    orthanc = None

__all__ = [
    "DEFAULT_RULES",
    "Forwarder",
    "Settings",
    "decide",
    "load_settings",
    "normalise_body_part",
    "normalise_view",
    "parse_rules",
    "route_task",
]

PREFIX = "orthonode_forward: "


def _why(error: Exception) -> str:
    """An OrthancException's description (its args are (code, description)), else its text."""
    args = getattr(error, "args", ())
    if len(args) == 2 and isinstance(args[1], str):
        return args[1]
    return str(error) or type(error).__name__


# --- Routing: a copy of dicom_node/route.py (keep identical; the unit tests compare) ----------

_BODY_PARTS = {
    "KNEE": "KNEE",
    "KNEEJOINT": "KNEE",
    "HIP": "HIP",
    "HIPJOINT": "HIP",
    "PELVIS": "PELVIS",
    "LSPINE": "LSPINE",
    "LUMBARSPINE": "LSPINE",
    "SPINELUMBAR": "LSPINE",
    "LUMBAR": "LSPINE",
    "LUMBOSACRAL": "LSPINE",
    "LSSPINE": "LSPINE",
}
_FRONTAL = {"AP", "PA", "APERECT", "APSUPINE", "FRONTAL"}
_LATERAL = {"LAT", "LL", "RL", "LATERAL", "LLAT", "RLAT", "XTABLE", "CROSSTABLE"}


def _squash(value: object) -> str:
    return re.sub(r"[^A-Z0-9]", "", str(value or "").upper())


def normalise_body_part(value: object) -> str | None:
    """BodyPartExamined as one of KNEE, HIP, PELVIS, LSPINE, or None when unknown."""
    return _BODY_PARTS.get(_squash(value))


def normalise_view(view_position: object, description: object = "") -> str | None:
    """``AP`` (frontal) or ``LAT``, from ViewPosition, else from the description's words."""
    squashed = _squash(view_position)
    if squashed in _FRONTAL:
        return "AP"
    if squashed in _LATERAL:
        return "LAT"
    words = set(re.split(r"[^A-Z]+", str(description or "").upper()))
    if words & {"LAT", "LATERAL", "LL", "RL"}:
        return "LAT"
    if words & {"AP", "PA", "FRONTAL"}:
        return "AP"
    return None


#: The node's default rules (dicom_node/config.py: one rule per task, from dicom_node/tasks.yaml).
DEFAULT_RULES: list[dict[str, Any]] = [
    {"task": "knee", "modality": ["CR", "DX"], "body_part": ["KNEE"], "series_description": None},
    {
        "task": "hip",
        "modality": ["CR", "DX"],
        "body_part": ["HIP", "PELVIS"],
        "series_description": None,
    },
    {
        "task": "spine",
        "modality": ["CR", "DX"],
        "body_part": ["LSPINE"],
        "series_description": None,
    },
]

_TASK_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")  # dicom_node/tasks.py TASK_NAME_PATTERN
_RULE_KEYS = {"task", "modality", "body_part", "series_description"}


def parse_rules(raw: object) -> list[dict[str, Any]]:
    """Rules as conf.yaml's ``routing.rules`` spells them (``task``, ``modality``, ``body_part``,
    ``series_description``), with the node's defaults filled in; ValueError names a bad one."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("Orthonode.Rules must be a non-empty list of rules")
    rules = []
    for index, rule in enumerate(raw):
        where = f"Orthonode.Rules[{index}]"
        if not isinstance(rule, dict):
            raise ValueError(f"{where} must be an object")
        unknown = sorted(set(rule) - _RULE_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; use {sorted(_RULE_KEYS)}")
        task = rule.get("task")
        if not isinstance(task, str) or not _TASK_NAME.match(task):
            raise ValueError(f"{where}.task must be a task name such as knee")
        modality = rule.get("modality", ["CR", "DX"])  # RoutingRule's default
        body_part = rule.get("body_part")
        for key, value in (("modality", modality), ("body_part", body_part)):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{where}.{key} must be a list of strings")
        description = rule.get("series_description")
        if description is not None:
            if not isinstance(description, str):
                raise ValueError(f"{where}.series_description must be a regular expression")
            try:
                re.compile(description)
            except re.error as error:
                raise ValueError(f"{where}.series_description: {error}") from None
        rules.append(
            {
                "task": task,
                "modality": list(modality),
                "body_part": list(body_part),
                "series_description": description,
            }
        )
    return rules


def route_task(tags: Mapping[str, object], rules: Iterable[Mapping[str, Any]]) -> str | None:
    """The task of the first rule that matches ``tags`` (keywords → values), or None.

    Exactly dicom_node.route.route's decision (without the laterality it also returns)."""
    modality = str(tags.get("Modality") or "").upper()
    body_part = normalise_body_part(tags.get("BodyPartExamined"))
    description = " ".join(
        str(tags.get(key) or "") for key in ("SeriesDescription", "ProtocolName")
    ).strip()
    view = normalise_view(tags.get("ViewPosition"), description)
    if view is None:
        return None
    for rule in rules:
        if rule["modality"] and modality not in {m.upper() for m in rule["modality"]}:
            continue
        wanted = {normalise_body_part(b) or b.upper() for b in rule["body_part"]}
        if body_part not in wanted:
            continue
        if rule["series_description"] and not re.search(
            rule["series_description"], description, flags=re.IGNORECASE
        ):
            continue
        return str(rule["task"])
    return None


# --- What to do with one instance -------------------------------------------------------------

#: SOP classes the node sends back: every SR (…88.x) and the Secondary Captures (…7, …7.x).
OUTPUT_SOP_CLASS_ROOTS = ("1.2.840.10008.5.1.4.1.1.88", "1.2.840.10008.5.1.4.1.1.7")
OUTPUT_MODALITIES = frozenset({"SR", "OT"})


def _is_output_sop_class(sop_class: object) -> bool:
    value = str(sop_class or "").strip()
    return any(value == root or value.startswith(root + ".") for root in OUTPUT_SOP_CLASS_ROOTS)


def is_node_output(
    tags: Mapping[str, object],
    metadata: Mapping[str, object],
    node_aet: str | None,
    node_username: str | None = None,
) -> bool:
    """An SR / Secondary Capture, or anything the node itself stored into Orthanc."""
    if _is_output_sop_class(tags.get("SOPClassUID") or metadata.get("SopClassUid")):
        return True
    if str(tags.get("Modality") or "").strip().upper() in OUTPUT_MODALITIES:
        return True
    remote = str(metadata.get("RemoteAET") or "").strip()
    if node_aet and remote == node_aet.strip():
        return True
    user = str(metadata.get("HttpUsername") or "")
    return bool(node_username) and user == node_username


def decide(
    tags: Mapping[str, object] | None,
    metadata: Mapping[str, object],
    settings: Settings,
    node_aet: str | None,
) -> str:
    """``forward``, or why not: ``forwarded`` (before), ``output`` (the node's), ``unmatched``.

    ``tags`` may be None when only the metadata was read (then only the first two are decided;
    the caller reads the tags when this returns ``needs-tags``)."""
    if settings.metadata_name in metadata:
        return "forwarded"
    if tags is None:
        if is_node_output({}, metadata, node_aet, settings.node_username):
            return "output"
        return "needs-tags"
    if is_node_output(tags, metadata, node_aet, settings.node_username):
        return "output"
    return "forward" if route_task(tags, settings.rules) else "unmatched"


# --- Settings: the "Orthonode" section of Orthanc's configuration ------------------------------


@dataclass(frozen=True)
class Settings:
    modality: str = "orthonode"
    transport: str = "dimse"  # or "dicomweb": STOW-RS to DicomWeb.Servers[DicomWebServer]
    dicomweb_server: str = "orthonode"
    node_aet: str | None = None  # None: the AET of the modality above
    node_username: str | None = None  # skip instances the node stored over HTTP as this user
    rules: list[dict[str, Any]] = field(default_factory=lambda: parse_rules(DEFAULT_RULES))
    metadata_name: str = "OrthonodeForwarded"
    pending_property: int = 7301
    retry_interval_s: float = 60.0
    retry_max_interval_s: float = 600.0
    max_attempts: int = 0  # 0: retry until it succeeds
    sweep_interval_s: float = 60.0
    verbose: bool = False


def load_settings(configuration: Mapping[str, Any]) -> Settings:
    """Settings from the whole Orthanc configuration; ValueError explains what is wrong."""
    section = configuration.get("Orthonode", {})
    if not isinstance(section, dict):
        raise ValueError("the Orthonode configuration section must be an object")
    known = {
        "Modality",
        "Transport",
        "DicomWebServer",
        "NodeAet",
        "NodeUsername",
        "Rules",
        "MetadataName",
        "PendingGlobalProperty",
        "RetryIntervalSeconds",
        "RetryMaxIntervalSeconds",
        "MaxAttempts",
        "SweepIntervalSeconds",
        "Verbose",
    }
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"Orthonode: unknown setting(s) {unknown}; known: {sorted(known)}")
    transport = str(section.get("Transport", "dimse")).lower()
    if transport not in ("dimse", "dicomweb"):
        raise ValueError('Orthonode.Transport must be "dimse" or "dicomweb"')
    metadata_name = str(section.get("MetadataName", "OrthonodeForwarded"))
    user_metadata = configuration.get("UserMetadata", {})
    if not isinstance(user_metadata, dict) or metadata_name not in user_metadata:
        raise ValueError(
            f'UserMetadata must declare "{metadata_name}" (e.g. "UserMetadata": '
            f'{{"{metadata_name}": 4301}}): the plugin remembers forwarded instances in it'
        )
    pending_property = int(section.get("PendingGlobalProperty", 7301))
    if pending_property < 1024:
        raise ValueError("Orthonode.PendingGlobalProperty must be >= 1024 (plugins' range)")
    retry = float(section.get("RetryIntervalSeconds", 60))
    retry_max = float(section.get("RetryMaxIntervalSeconds", max(600.0, retry)))
    if retry <= 0 or retry_max < retry:
        raise ValueError("Orthonode: need 0 < RetryIntervalSeconds <= RetryMaxIntervalSeconds")
    max_attempts = int(section.get("MaxAttempts", 0))
    if max_attempts < 0:
        raise ValueError("Orthonode.MaxAttempts must be >= 0 (0: no limit)")
    sweep = float(section.get("SweepIntervalSeconds", 60))
    if sweep <= 0:
        raise ValueError("Orthonode.SweepIntervalSeconds must be > 0")
    return Settings(
        modality=str(section.get("Modality", "orthonode")),
        transport=transport,
        dicomweb_server=str(section.get("DicomWebServer", "orthonode")),
        node_aet=section.get("NodeAet") or None,
        node_username=section.get("NodeUsername") or None,
        rules=parse_rules(section["Rules"]) if "Rules" in section else parse_rules(DEFAULT_RULES),
        metadata_name=metadata_name,
        pending_property=pending_property,
        retry_interval_s=retry,
        retry_max_interval_s=retry_max,
        max_attempts=max_attempts,
        sweep_interval_s=sweep,
        verbose=bool(section.get("Verbose", False)),
    )


# --- The worker --------------------------------------------------------------------------------


class OrthancApi:
    """The few calls the forwarder makes, on the real ``orthanc`` module."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def get(self, uri: str) -> Any:
        return json.loads(self.module.RestApiGet(uri))

    def post(self, uri: str, body: Mapping[str, Any]) -> Any:
        # "AfterPlugins": /dicom-web/... is the DICOMweb plugin's; plain RestApiPost only
        # reaches Orthanc's own routes.
        post = getattr(self.module, "RestApiPostAfterPlugins", self.module.RestApiPost)
        answer = post(uri, json.dumps(body))
        return json.loads(answer) if answer else None

    def put(self, uri: str, body: str) -> None:
        self.module.RestApiPut(uri, body)

    def get_property(self, number: int) -> str:
        return str(self.module.GetGlobalProperty(number, "") or "")

    def set_property(self, number: int, value: str) -> None:
        self.module.SetGlobalProperty(number, value)

    def is_unknown(self, error: Exception) -> bool:
        """The resource is gone (e.g. the study was deleted)."""
        code = getattr(self.module.ErrorCode, "UNKNOWN_RESOURCE", 17)
        return bool(getattr(error, "args", None)) and error.args[0] == code

    def log(self, level: str, message: str) -> None:
        {"info": self.module.LogInfo, "warning": self.module.LogWarning}.get(
            level, self.module.LogError
        )(PREFIX + message)


class Forwarder:
    """Takes stable studies, forwards what matches, remembers what was sent, retries failures.

    State kept in the Orthanc global property ``pending_property`` (JSON): ``pending``, the
    studies taken up but not yet sent (Orthanc ID -> failed attempts), and ``checkpoint``, the
    ``/changes`` sequence number up to which every new instance's study is known to have been
    looked at once stable. The sweep walks the changes after the checkpoint: a study that is
    stable but was not looked at since its last update (its STABLE_STUDY was lost in a restart,
    or is still on its way) is processed; the checkpoint stops before a study still receiving.
    """

    def __init__(
        self,
        api: Any,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._incoming: list[str] = []
        self._pending: dict[str, int] = {}  # Orthanc study ID -> failed attempts
        self._checkpoint: int | None = None  # None: not read yet / never set
        self._handled: dict[str, str] = {}  # study ID -> its LastUpdate when last processed
        self._next_retry: float | None = None
        self._next_sweep: float | None = None
        self._interval = settings.retry_interval_s
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._node_aet: str | None = settings.node_aet

    # --- called from Orthanc's change callback: never blocks, never calls the REST API
    def submit(self, study_id: str) -> None:
        with self._lock:
            self._incoming.append(study_id)
        self._wake.set()

    def start(self) -> None:
        self._load_state()
        s = self.settings
        target = (
            f"DICOMweb server '{s.dicomweb_server}'"
            if s.transport == "dicomweb"
            else f"modality '{s.modality}'"
        )
        self.api.log(
            "warning",
            f"forwarding stable studies to {target}; rules: "
            + ", ".join(
                f"{r['task']} ({'/'.join(r['modality']) or 'any'}: {'/'.join(r['body_part'])})"
                for r in s.rules
            )
            + f"; {len(self._pending)} study(ies) pending from before",
        )
        if self._pending:
            self._next_retry = self.clock()
        self._next_sweep = self.clock()  # at once: catches stable events lost in a restart
        self._thread = threading.Thread(target=self._run, name="orthonode-forward", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the worker thread
    def _run(self) -> None:
        while not self._stopping:
            deadlines = [t for t in (self._next_retry, self._next_sweep) if t is not None]
            timeout = max(0.0, min(deadlines) - self.clock()) if deadlines else None
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stopping:
                return
            try:
                self.run_once()
            except Exception as error:  # keep the thread alive whatever happens
                self.api.log("error", f"unexpected error: {error!r}")
                self._schedule_retry(failed=True)

    def run_once(self) -> None:
        """Take up new stable studies, the pending ones when their retry is due, and sweep."""
        with self._lock:
            incoming, self._incoming = self._incoming, []
        batch = list(dict.fromkeys(incoming))
        now = self.clock()
        due = self._next_retry is not None and now >= self._next_retry
        if due:
            batch += [study for study in self._pending if study not in batch]
        checkpoint = None
        if self._next_sweep is not None and now >= self._next_sweep:
            self._next_sweep = now + self.settings.sweep_interval_s
            missed, checkpoint = self._sweep()
            batch += [study for study in missed if study not in batch]
        if not batch:
            if checkpoint is not None and checkpoint != self._checkpoint:
                self._checkpoint = checkpoint
                self._save_state()
            return
        for study in batch:
            self._pending.setdefault(study, 0)
        self._save_state()  # before sending: a restart picks the batch up again
        failed = False
        for study in batch:
            if self._stopping:
                break
            if self.process(study):
                self._pending.pop(study, None)
                continue
            attempts = self._pending.get(study, 0) + 1
            self._pending[study] = attempts
            limit = self.settings.max_attempts
            if limit and attempts >= limit:
                self.api.log(
                    "error",
                    f"study {study}: giving up after {attempts} failed attempt(s); its "
                    "instances were not all sent (send them by hand from Orthanc)",
                )
                self._pending.pop(study, None)
            else:
                failed = True
        if checkpoint is not None and not self._stopping:
            self._checkpoint = checkpoint  # every study behind it is sent or pending
        if len(self._handled) > 10000:  # bounded memory; forgetting only costs a re-check
            self._handled.clear()
        self._save_state()
        self._schedule_retry(failed=failed, due=due)

    def _sweep(self, max_changes: int = 5000) -> tuple[list[str], int | None]:
        """Studies whose stable event was missed, and how far the checkpoint may move."""
        try:
            if self._checkpoint is None:  # first start: from now on, not the whole archive
                return [], int(self.api.get("/changes?last")["Last"])
            seq = self._checkpoint
            missed: list[str] = []
            studies: dict[str, Any] = {}  # instance -> its study (this sweep only)
            walked = 0
            while walked < max_changes:
                page = self.api.get(f"/changes?since={seq}&limit=500")
                for change in page["Changes"]:
                    walked += 1
                    if change["ChangeType"] == "NewInstance":
                        try:
                            study = studies.get(change["ID"]) or self.api.get(
                                f"/instances/{change['ID']}/study"
                            )
                        except Exception as error:
                            if not self.api.is_unknown(error):
                                raise
                            study = None  # deleted since: nothing to do
                        if study is not None:
                            studies[change["ID"]] = study
                            if not study.get("IsStable"):
                                return missed, seq  # still receiving: its event will come
                            study_id = str(study["ID"])
                            last = str(study.get("LastUpdate", ""))
                            if self._handled.get(study_id) != last and study_id not in missed:
                                missed.append(study_id)
                    seq = int(change["Seq"])
                if page.get("Done", True) or not page["Changes"]:
                    return missed, max(seq, int(page.get("Last", seq)))
            return missed, seq
        except Exception as error:
            self.api.log("warning", f"cannot read Orthanc's changes ({_why(error)}); later")
            return [], None

    def _schedule_retry(self, failed: bool, due: bool = False) -> None:
        if failed:
            if due:  # a retry round failed again: back off
                self._interval = min(self._interval * 2, self.settings.retry_max_interval_s)
            self._next_retry = self.clock() + self._interval
        elif not self._pending:
            self._next_retry = None
            self._interval = self.settings.retry_interval_s
        elif self._next_retry is None:
            self._next_retry = self.clock() + self._interval

    def node_aet(self) -> str | None:
        if self._node_aet is None and self.settings.transport == "dimse":
            try:
                modalities = self.api.get("/modalities?expand")
                entry = modalities.get(self.settings.modality)
                if entry is None:
                    raise ValueError("not defined")
                self._node_aet = str(entry["AET"])
            except Exception as error:
                self.api.log(
                    "error",
                    f"modality '{self.settings.modality}' ({error}): register the node under "
                    "DicomModalities",
                )
        return self._node_aet

    def process(self, study_id: str) -> bool:
        """Forward what this study holds that should go to the node; False: retry later."""
        s = self.settings
        try:
            study = self.api.get(f"/studies/{study_id}")
        except Exception as error:
            if self.api.is_unknown(error):
                return True  # deleted meanwhile: nothing to do
            self.api.log("warning", f"study {study_id}: cannot read it ({_why(error)}); will retry")
            return False
        study_uid = study.get("MainDicomTags", {}).get("StudyInstanceUID", study_id)
        # Looked at as of this update (a failure leaves it pending, which is kept too).
        self._handled[study_id] = str(study.get("LastUpdate", ""))
        node_aet = self.node_aet()
        if s.transport == "dimse" and node_aet is None:
            return False
        wanted = {m.upper() for r in s.rules for m in r["modality"]}
        any_modality = any(not r["modality"] for r in s.rules)
        counts = {"forwarded": 0, "output": 0, "unmatched": 0}
        selected: list[tuple[str, str]] = []  # (Orthanc instance ID, SOP Instance UID)
        try:
            for series_id in study.get("Series", []):
                series = self.api.get(f"/series/{series_id}")
                modality = str(series.get("MainDicomTags", {}).get("Modality") or "").upper()
                instances = list(series.get("Instances", []))
                if modality in OUTPUT_MODALITIES:
                    counts["output"] += len(instances)
                    continue
                if not any_modality and modality and modality not in wanted:
                    counts["unmatched"] += len(instances)
                    continue
                for instance in instances:
                    metadata = self.api.get(f"/instances/{instance}/metadata?expand")
                    verdict = decide(None, metadata, s, node_aet)
                    tags: dict[str, Any] = {}
                    if verdict == "needs-tags":
                        tags = self.api.get(f"/instances/{instance}/tags?simplify")
                        verdict = decide(tags, metadata, s, node_aet)
                    if verdict == "forward":
                        selected.append((instance, str(tags.get("SOPInstanceUID", instance))))
                    else:
                        counts[verdict] += 1
        except Exception as error:
            if self.api.is_unknown(error):
                return True
            self.api.log(
                "warning", f"study {study_uid}: cannot read it ({_why(error)}); will retry"
            )
            return False
        summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
        if not selected:
            self.api.log(
                "warning" if s.verbose else "info",
                f"study {study_uid}: nothing to forward ({summary or 'no instances'})",
            )
            return True
        if s.transport == "dicomweb":
            uri, target = f"/dicom-web/servers/{s.dicomweb_server}/stow", s.dicomweb_server
        else:
            uri, target = f"/modalities/{s.modality}/store", s.modality
        resources = [instance for instance, _ in selected]
        try:
            self.api.post(uri, {"Resources": resources, "Synchronous": True})
        except Exception as error:
            self.api.log(
                "warning",
                f"study {study_uid}: sending {len(selected)} instance(s) to '{target}' "
                f"failed ({_why(error)}); will retry",
            )
            return False
        utc = datetime.timezone.utc  # noqa: UP017 (datetime.UTC needs Python 3.11)
        stamp = datetime.datetime.now(utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        for instance in resources:
            try:
                self.api.put(f"/instances/{instance}/metadata/{s.metadata_name}", stamp)
            except Exception as error:  # sent, not remembered: it may be sent again
                self.api.log(
                    "warning", f"instance {instance}: cannot mark it forwarded: {_why(error)}"
                )
        self.api.log(
            "warning",
            f"study {study_uid}: forwarded {len(selected)} instance(s) to '{target}' "
            f"(SOP Instance UIDs {', '.join(uid for _, uid in selected)})"
            + (f"; skipped {summary}" if summary else ""),
        )
        return True

    # --- the pending list and the checkpoint, in an Orthanc global property
    def _load_state(self) -> None:
        try:
            raw = self.api.get_property(self.settings.pending_property)
            value = json.loads(raw) if raw else {}
            if not isinstance(value, dict):
                raise ValueError("not an object")
            pending = value.get("pending", {})
            self._pending = {str(k): int(v) for k, v in pending.items()}
            checkpoint = value.get("checkpoint")
            self._checkpoint = None if checkpoint is None else int(checkpoint)
        except Exception as error:
            self.api.log("error", f"saved state unreadable ({_why(error)}); starting afresh")
            self._pending, self._checkpoint = {}, None

    def _save_state(self) -> None:
        state = {"pending": self._pending, "checkpoint": self._checkpoint}
        try:
            self.api.set_property(self.settings.pending_property, json.dumps(state, sort_keys=True))
        except Exception as error:
            self.api.log("error", f"cannot save the pending list: {_why(error)}")


# --- Registration, inside Orthanc only ----------------------------------------------------------

_FORWARDER: Forwarder | None = None


def _install(module: Any) -> None:
    global _FORWARDER
    api = OrthancApi(module)
    try:
        settings = load_settings(json.loads(module.GetConfiguration()))
    except ValueError as error:
        api.log("error", f"not forwarding anything: {error}")
        return
    forwarder = _FORWARDER = Forwarder(api, settings)

    def on_change(change_type: Any, level: Any, resource_id: str) -> None:
        if change_type == module.ChangeType.STABLE_STUDY:
            forwarder.submit(resource_id)
        elif change_type == module.ChangeType.ORTHANC_STARTED:
            forwarder.start()
        elif change_type == module.ChangeType.ORTHANC_STOPPED:
            forwarder.stop()

    module.RegisterOnChangeCallback(on_change)


if orthanc is not None and hasattr(orthanc, "RegisterOnChangeCallback"):
    _install(orthanc)
