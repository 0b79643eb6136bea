"""conf.yaml as typed pydantic models, with errors that name the key and the fix.

Every key has a default, so an empty file is a working configuration (no peers allow-list, no
destinations, the bundled weights, SQLite spool under ./spool). Any key can be overridden from
the environment: ``ORTHONODE_`` + the key path in capitals, ``__`` between levels
(``ORTHONODE_NODE__AE_TITLE=ORTHO1``, ``ORTHONODE_SPOOL__DIRECTORY=/var/lib/orthonode``; lists
and mappings as JSON). The environment wins over the file; see docs/operations.md.

Tasks: ``tasks.<name>`` names a bundle; a task that is not built in (:mod:`dicom_node.tasks`)
also gives its ``spec:``. Without a ``routing:`` list, each enabled task's spec gives its rule.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dicom_node.errors import ConfigError
from dicom_node.tasks import TASK_NAME_PATTERN, TaskSpec, builtin_tasks, parse_spec

__all__ = [
    "AssemblyConfig",
    "AuditConfig",
    "Config",
    "DestinationConfig",
    "HealthConfig",
    "HttpConfig",
    "InferenceConfig",
    "NodeConfig",
    "OutputsConfig",
    "PeerConfig",
    "RoutingRule",
    "SendConfig",
    "SpoolConfig",
    "TaskConfig",
    "TlsConfig",
    "load_config",
    "parse_ae_address",
]

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # VR AE: no backslash, ≤ 16 chars
ENV_PREFIX = "ORTHONODE_"


def _check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_TITLE.match(value) or len(stripped) > 16:
        raise ValueError(
            f"{value!r} is not a valid AE title: use 1-16 printable ASCII characters, "
            "no backslash (e.g. ORTHONODE)"
        )
    return stripped


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PeerConfig(_Model):
    """A calling AE allowed to send to the node."""

    ae_title: str = Field(description="the peer's AE title")
    host: str | None = Field(default=None, description="its address; omit to allow any host")

    _ae = field_validator("ae_title")(_check_ae_title)


class TlsConfig(_Model):
    """DICOM TLS (PS3.15 B.1, the BCP 195 profiles: TLS 1.2 or later) for the node or a
    destination. Certificates and keys are read from files; nothing secret is in conf.yaml."""

    certificate: Path | None = Field(
        default=None, description="PEM certificate chain (the node's; a client's for mutual TLS)"
    )
    private_key: Path | None = Field(default=None, description="PEM private key, unencrypted")
    ca_certificates: Path | None = Field(
        default=None,
        description="PEM CA bundle: node, the CAs of client certificates it accepts; "
        "destination, the CAs it trusts (default: the system's)",
    )
    require_client_certificate: bool = Field(
        default=False, description="node only: refuse peers without a certificate from the CAs"
    )
    server_name: str | None = Field(
        default=None,
        description="destination only: the name its certificate must carry (default: host)",
    )

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("give certificate and private_key together")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates")
        return self

    def resolved(self, root: Path) -> TlsConfig:
        return self.model_copy(
            update={
                "certificate": _absolute(self.certificate, root),
                "private_key": _absolute(self.private_key, root),
                "ca_certificates": _absolute(self.ca_certificates, root),
            }
        )


class DestinationConfig(_Model):
    """Where results are sent: a C-STORE SCP (``type: dimse``, the default) or a DICOMweb
    STOW-RS service (``type: dicomweb``). Secrets (a bearer token, a password) are read from a
    file or an environment variable, never written in conf.yaml.

    The types, and what a destination of each needs, come from the registry of destination
    types (:mod:`dicom_node.send.transport`), the one place a type is added: ``type`` is checked
    against it and the type's own check validates the rest."""

    type: str = Field(
        default="dimse",
        description="dimse: C-STORE; dicomweb: STOW-RS; or another registered type",
    )
    name: str = Field(default="", description="a name for logs and metrics")
    ae_title: str | None = Field(default=None, description="dimse: the destination's AE title")
    host: str | None = Field(default=None, description="dimse: its host name or address")
    port: int = Field(default=104, ge=1, le=65535, description="dimse: its DICOM port")
    url: str | None = Field(
        default=None,
        description="dicomweb: the service's base URL (e.g. http://orthanc:8042/dicom-web); "
        "instances are POSTed to {url}/studies",
    )
    token_file: Path | None = Field(default=None, description="dicomweb: bearer token, a file")
    token_env: str | None = Field(
        default=None, description="dicomweb: bearer token, the name of an environment variable"
    )
    username: str | None = Field(default=None, description="dicomweb: HTTP basic auth user")
    password_env: str | None = Field(
        default=None, description="dicomweb: the environment variable holding the password"
    )
    timeout_s: float = Field(default=60.0, gt=0, description="dicomweb: per request")
    tls: TlsConfig | None = Field(
        default=None,
        description="dimse: send over DICOM TLS; dicomweb: the CAs to trust (ca_certificates) "
        "and a client certificate for https:// URLs",
    )

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)

    @field_validator("type")
    @classmethod
    def _registered(cls, value: str) -> str:
        # Imported here, not at the top: dicom_node.send imports this module.
        from dicom_node.send.transport import destination_type

        destination_type(value)  # ValueError listing the registered types
        return value

    @model_validator(mode="after")
    def _complete(self) -> DestinationConfig:
        if self.tls is not None and self.tls.require_client_certificate:
            raise ValueError("tls.require_client_certificate is a node setting")
        from dicom_node.send.transport import destination_type

        destination_type(self.type).check(self)  # dimse: scu.py, dicomweb: stow.py
        return self

    @property
    def key(self) -> str:
        """How the outbound queue names this destination: ``name``, else the AE title or URL."""
        return self.name or self.ae_title or self.url or ""


class HttpConfig(_Model):
    """The HTTP port's services beyond /metrics: STOW-RS, the status page and its actions."""

    tokens_file: Path | None = Field(
        default=None,
        description="bearer tokens for STOW-RS and the status page's actions, one per line as "
        "`name token` or `token` (ORTHONODE_HTTP_TOKENS adds comma-separated ones); with none, "
        "only clients on this host (loopback) may write",
    )
    tls: TlsConfig | None = Field(
        default=None, description="serve HTTPS (certificate and private_key) on node.http_port"
    )
    max_upload_mb: int = Field(
        default=2048, ge=1, description="largest STOW-RS request body; larger ones get 413"
    )
    recent_studies: int = Field(default=25, ge=1, le=500, description="on the status page")

    @model_validator(mode="after")
    def _server_side(self) -> HttpConfig:
        if self.tls is not None and (self.tls.certificate is None or self.tls.private_key is None):
            raise ValueError("http.tls needs certificate and private_key")
        return self


class NodeConfig(_Model):
    """The node's own DICOM identity and association limits."""

    ae_title: str = Field(default="ORTHONODE", description="the AE title PACS send to")
    host: str = Field(default="0.0.0.0", description="address to listen on")
    port: int = Field(default=11112, ge=0, le=65535, description="DICOM port (0: any free)")
    # A PACS forwards over up to 16 parallel associations (issue 20: 8 storescu from one host
    # failed at 10 / 6): one host may hold 24 of 32 slots, so another sender keeps 8; idle and
    # slow peers are held off by the pre-association gate, not by these limits.
    max_associations: int = Field(default=32, ge=1, le=200)
    max_pdu: int = Field(
        default=131072, ge=0, description="maximum PDU size received; 0 = the largest, 16 MiB"
    )
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=30.0, gt=0)
    network_timeout_s: float = Field(
        default=60.0, gt=0, description="idle association, and the most one PDU may take"
    )
    pre_association_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="a connection must send its A-ASSOCIATE-RQ (after TLS) within this",
    )
    max_pending_connections: int = Field(
        default=128, ge=1, description="connections waiting for their A-ASSOCIATE-RQ, in all"
    )
    max_pending_per_host: int = Field(
        default=16, ge=1, description="connections waiting for their A-ASSOCIATE-RQ, per host"
    )
    max_associations_per_host: int = Field(
        default=24,
        ge=1,
        description="associations one host may hold (at most max_associations); the next is "
        "rejected as transient, local limit exceeded",
    )
    max_image_pixels: int = Field(
        default=120_000_000,
        ge=1,
        description="rows x columns x frames above which C-STORE answers 0xA700",
    )
    max_dataset_mb: int = Field(
        default=1024,
        ge=1,
        description="largest data set received (inflated); a bigger one aborts or is refused",
    )
    http_port: int = Field(default=8080, ge=0, le=65535, description="status/metrics port")
    tls: TlsConfig | None = Field(
        default=None, description="listen with DICOM TLS only (certificate and private_key)"
    )

    _ae = field_validator("ae_title")(_check_ae_title)

    @model_validator(mode="after")
    def _tls_has_a_certificate(self) -> NodeConfig:
        if self.tls is not None and self.tls.certificate is None:
            raise ValueError("tls: the node needs a certificate and private_key")
        return self


class SpoolConfig(_Model):
    """Where received instances and the SQLite index live."""

    directory: Path = Field(default=Path("spool"), description="spool directory")
    min_free_mb: int = Field(
        default=1024, ge=0, description="below this free space C-STORE answers 0xA700"
    )


class AssemblyConfig(_Model):
    """When a study is ready."""

    stable_after_s: float = Field(
        default=10.0,
        gt=0,
        description="process a study with a missing view after this many seconds of quiet",
    )


class TaskConfig(_Model):
    """One clinical task: its weight bundle and (for a task that is not built in) its spec."""

    enabled: bool = True
    bundle: Path = Field(description="folder with model.pt and card.json")
    spec: TaskSpec | None = Field(
        default=None,
        description="the task's facts (dicom_node/tasks.yaml shape); built-in tasks have one",
    )


class RoutingRule(_Model):
    """Instances matching every given field go to (task, view); unmatched ones are ignored."""

    task: str = Field(pattern=TASK_NAME_PATTERN, description="a task under tasks:")
    modality: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    body_part: list[str] = Field(description="normalised BodyPartExamined values, e.g. KNEE")
    series_description: str | None = Field(
        default=None, description="regular expression on SeriesDescription or ProtocolName"
    )


class RoutingConfig(_Model):
    """Which task and view each instance goes to: rules on its tags, checked by the image.

    ``image_check`` (a small model that reads the image: anatomy, view, implant present):
    ``confirm`` routes by the rules and answers "not applicable" when the image contradicts
    them; ``fallback`` also routes by the image when the tags are missing or contradict it;
    ``off`` trusts the tags alone.
    """

    image_check: Literal["confirm", "fallback", "off"] = "confirm"
    image_check_bundle: Path = Field(
        default=Path("weights/image-check"), description="the image check's model.pt + card.json"
    )
    rules: list[RoutingRule] = Field(
        default_factory=list, description="empty: one rule per enabled task, from its spec"
    )

    @model_validator(mode="before")
    @classmethod
    def _rules_only(cls, data: Any) -> Any:
        if isinstance(data, list):  # `routing:` as a plain list of rules (before 0.2)
            return {"rules": data}
        return data


#: Why ``outputs.saliency`` offers no Parametric Map (docs/operations.md says the same).
_PARAMETRIC_MAP_REFUSED = (
    "parametric-map is not offered: OHIF 3.13.2 does not display a Parametric Map of a single "
    "2D image ('Referenced Volume is missing for the PMAP, and stack viewport PMAP is not "
    "supported yet') and highdicom 0.28 cannot build one for a radiograph without a Frame of "
    "Reference; use sc, segmentation or both"
)


class OutputsConfig(_Model):
    """What the node sends back."""

    when_not_applicable: Literal["report", "skip"] = Field(
        default="report",
        description="report: an SR that says 'not applicable' and why; skip: nothing",
    )
    saliency: Literal["sc", "segmentation", "both"] = Field(
        default="sc",
        description="the saliency of each analysed image as a Secondary Capture (sc: the "
        "heatmap burned into a copy of the image, every viewer shows it), a DICOM Segmentation "
        "of its high-saliency region (segmentation: an overlay a viewer draws over the image), "
        "or both",
    )

    @field_validator("saliency", mode="before")
    @classmethod
    def _no_parametric_map(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower().replace("_", "-") in (
            "parametric-map",
            "parametricmap",
            "pmap",
        ):
            raise ValueError(_PARAMETRIC_MAP_REFUSED)
        return value


class InferenceConfig(_Model):
    """The inference worker."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    saliency: Literal["gradcam", "integrated-gradients"] = "gradcam"
    batch_size: int = Field(default=8, ge=1, le=256)


class SendConfig(_Model):
    """The outbound queue's retry policy."""

    max_attempts: int = Field(default=8, ge=1, description="then the send is dead-lettered")
    associations: int = Field(
        default=1, ge=1, le=32, description="associations per destination at once"
    )
    backoff_initial_s: float = Field(default=5.0, gt=0)
    backoff_max_s: float = Field(default=600.0, gt=0)
    dimse_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="a destination slower than this to answer a C-STORE is aborted; retried",
    )


class HealthConfig(_Model):
    """When the node says it is degraded (``/readyz`` 200 with ``"state": "degraded"``, the
    status page's amber header, ``orthonode_health_state`` 1): it still takes studies, but
    something waits for an administrator. 0 turns a warning off."""

    dead_letters_warning: int = Field(
        default=1, ge=0, description="degraded while at least this many dead letters wait"
    )
    failed_studies_warning: int = Field(
        default=1,
        ge=0,
        description="degraded while at least this many studies failed within failed_window_h",
    )
    failed_window_h: float = Field(
        default=24.0, gt=0, description="how far back a failed study counts (hours)"
    )


class AuditConfig(_Model):
    """The audit trail (dicom_node/audit.py): JSON lines, rotated, UIDs only."""

    enabled: bool = True
    file: Path | None = Field(
        default=None, description="default: audit.jsonl in the spool directory"
    )
    max_mb: int = Field(default=100, ge=1, description="rotate at this size")
    backups: int = Field(default=10, ge=1, description="rotated files kept")


def _default_tasks() -> dict[str, TaskConfig]:
    return {
        name: TaskConfig(bundle=Path("weights") / name, spec=spec)
        for name, spec in builtin_tasks().items()
    }


def _spec_rules(tasks: dict[str, TaskConfig]) -> list[RoutingRule]:
    """One rule per enabled task, from its spec's routing defaults."""
    return [
        RoutingRule(task=name, **task.spec.routing.model_dump())
        for name, task in tasks.items()
        if task.enabled and task.spec is not None
    ]


class Config(BaseSettings):
    """The whole of conf.yaml (and ``ORTHONODE_*`` environment overrides)."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        nested_model_default_partial_update=True,
    )

    node: NodeConfig = Field(default_factory=NodeConfig)
    peers: list[PeerConfig] = Field(default_factory=list, description="empty: accept any AE")
    destinations: list[DestinationConfig] = Field(default_factory=list)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    assembly: AssemblyConfig = Field(default_factory=AssemblyConfig)
    tasks: dict[str, TaskConfig] = Field(default_factory=_default_tasks)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    send: SendConfig = Field(default_factory=SendConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides conf.yaml (passed as init values); no .env file is read.
        return env_settings, init_settings

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_specs(cls, value: Any) -> Any:
        """Give each built-in task its spec; a task that is not built in must bring one."""
        if not isinstance(value, dict):
            return value
        builtin = builtin_tasks()
        resolved = {}
        for name, task in value.items():
            if isinstance(task, TaskConfig):
                task = task.model_dump()
            if not re.match(TASK_NAME_PATTERN, str(name)):
                raise ValueError(
                    f"task name {name!r}: use lower-case letters, digits and dashes (e.g. knee-oa)"
                )
            if not isinstance(task, dict):
                resolved[name] = task  # the field's own validation names the problem
                continue
            spec = task.get("spec")
            if isinstance(spec, dict):
                task = {**task, "spec": parse_spec(str(name), spec)}
            elif spec is None and name in builtin:
                task = {**task, "spec": builtin[name]}
            elif spec is None:
                raise ValueError(
                    f"task {name!r} is not built in ({', '.join(sorted(builtin))}): give it a "
                    f"spec: under tasks.{name} (see docs/operations.md, 'Adding a task')"
                )
            resolved[name] = task
        return resolved

    @model_validator(mode="after")
    def _rules_name_tasks(self) -> Config:
        if not self.routing.rules:
            # A frozen model: set the derived default once, while it is being built.
            object.__setattr__(self.routing, "rules", _spec_rules(self.tasks))
        unknown = sorted({rule.task for rule in self.routing.rules} - set(self.tasks))
        if unknown:
            raise ValueError(
                f"routing rules name task(s) {unknown} that are not under tasks: "
                f"({', '.join(sorted(self.tasks))})"
            )
        return self

    def spec(self, task: str) -> TaskSpec:
        """The spec of a configured task (every configured task has one once validated)."""
        spec = self.tasks[task].spec
        assert spec is not None  # _task_specs fills it or refuses the configuration
        return spec


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def load_config(path: Path | None, base: Path | None = None) -> Config:
    """Read and validate conf.yaml; relative paths are resolved against the file's folder.

    Raises
    ------
    ConfigError
        With one line per problem, naming the key and what to do.
    """
    raw: object = {}
    if path is not None:
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except OSError as error:
            raise ConfigError(f"cannot read {path}: {error.strerror}") from error
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (node:, peers: ...)")
    try:
        config = Config(**raw)
    except ValidationError as error:
        problems = [f"  {_location(e['loc'])}: {e['msg']}" for e in error.errors()]
        raise ConfigError(
            f"{path or 'configuration'} is invalid:\n" + "\n".join(problems)
        ) from None
    root = base or (path.parent if path is not None else Path.cwd())
    return _resolve(config, root)


def _absolute(p: Path | None, root: Path) -> Path | None:
    """An optional configured path, read from conf.yaml's folder (``root``) when relative."""
    return p if p is None or p.is_absolute() else root / p


def _resolve(config: Config, root: Path) -> Config:
    def absolute(p: Path) -> Path:
        return p if p.is_absolute() else (root / p)

    tasks = {
        name: task.model_copy(update={"bundle": absolute(task.bundle)})
        for name, task in config.tasks.items()
    }
    spool = config.spool.model_copy(update={"directory": absolute(config.spool.directory)})
    routing = config.routing.model_copy(
        update={"image_check_bundle": absolute(config.routing.image_check_bundle)}
    )
    node = config.node
    if node.tls is not None:
        node = node.model_copy(update={"tls": node.tls.resolved(root)})
    destinations = [
        d.model_copy(
            update={
                "tls": None if d.tls is None else d.tls.resolved(root),
                "token_file": _absolute(d.token_file, root),
            }
        )
        for d in config.destinations
    ]
    http = config.http.model_copy(
        update={
            "tokens_file": _absolute(config.http.tokens_file, root),
            "tls": None if config.http.tls is None else config.http.tls.resolved(root),
        }
    )
    # Its default (audit.jsonl in the spool) is open_audit's, for resolved and raw configs alike.
    audit = config.audit.model_copy(update={"file": _absolute(config.audit.file, root)})
    return config.model_copy(
        update={
            "audit": audit,
            "tasks": tasks,
            "spool": spool,
            "routing": routing,
            "node": node,
            "destinations": destinations,
            "http": http,
        }
    )


def parse_ae_address(text: str) -> DestinationConfig:
    """Parse ``AE@host:port`` (as the CLI takes it) into a destination."""
    match = re.match(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$", text)
    if not match:
        raise ConfigError(f"{text!r}: expected AE_TITLE@host:port, e.g. PACS@127.0.0.1:4242")
    try:
        return DestinationConfig(
            name=match["ae"], ae_title=match["ae"], host=match["host"], port=int(match["port"])
        )
    except ValidationError as error:
        raise ConfigError(f"{text!r}: {error.errors()[0]['msg']}") from None
