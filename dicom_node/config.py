"""conf.yaml as typed pydantic models, with errors that name the key and the fix.

Every key has a default, so an empty file is a working configuration (no peers allow-list, no
destinations, the bundled weights, SQLite spool under ./spool). Secrets may come from the
environment (``ORTHONODE_*``); see docs/operations.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dicom_node.errors import ConfigError

__all__ = [
    "AssemblyConfig",
    "Config",
    "DestinationConfig",
    "InferenceConfig",
    "NodeConfig",
    "PeerConfig",
    "RoutingRule",
    "SendConfig",
    "SpoolConfig",
    "TaskConfig",
    "load_config",
    "parse_ae_address",
]

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # VR AE: no backslash, ≤ 16 chars
TASK_NAMES = ("knee", "hip", "spine")


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


class DestinationConfig(_Model):
    """Where results are sent (C-STORE SCU)."""

    name: str = Field(default="", description="a name for logs and metrics")
    ae_title: str = Field(description="the destination's AE title (the PACS)")
    host: str = Field(description="its host name or address")
    port: int = Field(default=104, ge=1, le=65535, description="its DICOM port")

    _ae = field_validator("ae_title")(_check_ae_title)


class NodeConfig(_Model):
    """The node's own DICOM identity and association limits."""

    ae_title: str = Field(default="ORTHONODE", description="the AE title PACS send to")
    host: str = Field(default="0.0.0.0", description="address to listen on")
    port: int = Field(default=11112, ge=0, le=65535, description="DICOM port (0: any free)")
    max_associations: int = Field(default=10, ge=1, le=200)
    max_pdu: int = Field(default=131072, ge=0, description="maximum PDU size; 0 = unlimited")
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=30.0, gt=0)
    network_timeout_s: float = Field(default=60.0, gt=0)
    http_port: int = Field(default=8080, ge=0, le=65535, description="status/metrics port")

    _ae = field_validator("ae_title")(_check_ae_title)


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
    """One clinical task and its weight bundle."""

    enabled: bool = True
    bundle: Path = Field(description="folder with model.pt and card.json")


class RoutingRule(_Model):
    """Instances matching every given field go to (task, view); unmatched ones are ignored."""

    task: Literal["knee", "hip", "spine"]
    modality: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    body_part: list[str] = Field(description="normalised BodyPartExamined values, e.g. KNEE")
    series_description: str | None = Field(
        default=None, description="regular expression on SeriesDescription or ProtocolName"
    )


class InferenceConfig(_Model):
    """The inference worker."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    saliency: Literal["gradcam", "integrated-gradients"] = "gradcam"
    batch_size: int = Field(default=8, ge=1, le=256)


class SendConfig(_Model):
    """The outbound queue's retry policy."""

    max_attempts: int = Field(default=8, ge=1, description="then the send is dead-lettered")
    backoff_initial_s: float = Field(default=5.0, gt=0)
    backoff_max_s: float = Field(default=600.0, gt=0)


def _default_tasks() -> dict[str, TaskConfig]:
    return {name: TaskConfig(bundle=Path("weights") / name) for name in TASK_NAMES}


def _default_rules() -> list[RoutingRule]:
    return [
        RoutingRule(task="knee", body_part=["KNEE"]),
        RoutingRule(task="hip", body_part=["HIP", "PELVIS"]),
        RoutingRule(task="spine", body_part=["LSPINE"]),
    ]


class Config(_Model):
    """The whole of conf.yaml."""

    node: NodeConfig = Field(default_factory=NodeConfig)
    peers: list[PeerConfig] = Field(default_factory=list, description="empty: accept any AE")
    destinations: list[DestinationConfig] = Field(default_factory=list)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    assembly: AssemblyConfig = Field(default_factory=AssemblyConfig)
    tasks: dict[str, TaskConfig] = Field(default_factory=_default_tasks)
    routing: list[RoutingRule] = Field(default_factory=_default_rules)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    send: SendConfig = Field(default_factory=SendConfig)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: dict[str, TaskConfig]) -> dict[str, TaskConfig]:
        unknown = sorted(set(value) - set(TASK_NAMES))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; the tasks are {list(TASK_NAMES)}")
        return value


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
        config = Config.model_validate(raw)
    except ValidationError as error:
        problems = [f"  {_location(e['loc'])}: {e['msg']}" for e in error.errors()]
        raise ConfigError(
            f"{path or 'configuration'} is invalid:\n" + "\n".join(problems)
        ) from None
    root = base or (path.parent if path is not None else Path.cwd())
    return _resolve(config, root)


def _resolve(config: Config, root: Path) -> Config:
    def absolute(p: Path) -> Path:
        return p if p.is_absolute() else (root / p)

    tasks = {
        name: task.model_copy(update={"bundle": absolute(task.bundle)})
        for name, task in config.tasks.items()
    }
    spool = config.spool.model_copy(update={"directory": absolute(config.spool.directory)})
    return config.model_copy(update={"tasks": tasks, "spool": spool})


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
