"""The deployment material in deploy/ (docs/deploy.md): the compose file, the systemd unit, the
container images' Dockerfiles, the node's container configuration and the monitoring files.

- ``docker compose config`` (or the older ``docker-compose config``) validates
  deploy/docker-compose.yml with and without ``--profile monitoring``; the services and every
  file it mounts are checked against the repository. Skipped without a compose tool unless
  CI=true, where it fails.
- ``systemd-analyze verify`` checks deploy/systemd/orthonode.service. The unit's ExecStart is
  /opt/orthonode/venv/bin/python, which exists only on an installed host, and verify refuses
  a unit whose binary is missing; so the test verifies a copy, in a temporary folder, whose
  ExecStart names this test's own interpreter (everything else byte for byte the same), and
  checks the original's ExecStart line separately. Verify reports unknown keys as warnings
  with exit status 0, so its output is checked for them too. ``systemd-sysusers --dry-run``
  under a temporary root checks the sysusers file. Skipped without the tools unless CI=true.
- The container's conf.yaml loads with the node's own loader, names the image's paths, and
  its bundles (the repository's weights/, which the image copies) load.
- The Dockerfiles' static facts: a non-root USER, HEALTHCHECK on /healthz, EXPOSE 11112 and
  8080, torch and torchvision pinned as in pyproject.toml, the entrypoint. Building the image
  needs a Docker engine: ``ORTHONODE_TEST_DOCKER_BUILD=1`` runs that test where one answers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_node.config import load_config
from tests.conftest import require_tool, system_tool

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
UNIT = DEPLOY / "systemd" / "orthonode.service"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"]
IMAGE_WEIGHTS = Path("/opt/orthonode/weights")
IN_CI = os.environ.get("CI", "").lower() == "true"


def _skip_or_fail(why: str) -> None:
    if IN_CI:
        pytest.fail(f"{why}, and CI=true requires it (.ci/run installs it)")
    pytest.skip(f"{why} (set CI=true to make this a failure)")


# --- docker compose ---------------------------------------------------------------------------


def _compose_command() -> list[str] | None:
    """``docker compose`` (the v2 plugin) when it answers, else ``docker-compose`` (v1)."""
    docker = system_tool("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=60
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = system_tool("docker-compose")
    return [legacy] if legacy else None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    command = _compose_command()
    if command is None:
        _skip_or_fail("neither `docker compose` nor docker-compose is installed")
    assert command is not None
    return command


def _compose_config(compose: list[str], *profiles: str) -> dict[str, Any]:
    args = [*compose, "-f", str(COMPOSE_FILE)]
    for profile in profiles:
        args += ["--profile", profile]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    result = subprocess.run(
        [*args, "config"], capture_output=True, text=True, timeout=120, cwd=DEPLOY, env=env
    )
    assert result.returncode == 0, f"{' '.join(args)} config failed:\n{result.stderr}"
    parsed = yaml.safe_load(result.stdout)
    assert isinstance(parsed, dict) and isinstance(parsed.get("services"), dict)
    return parsed


def _binds(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (short or long syntax)."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                found[volume["target"]] = Path(volume["source"])
            continue
        source, target = str(volume).split(":")[:2]
        if source.startswith(("/", ".")):
            found[target] = Path(source)
    return found


def _published(service: dict[str, Any]) -> set[int]:
    ports = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.add(int(port["target"]))
        else:
            ports.add(int(str(port).split("/")[0].rsplit(":", 1)[-1]))
    return ports


@pytest.mark.integration
def test_compose_config_validates(compose: list[str]) -> None:
    plain = _compose_config(compose)["services"]
    assert {"orthonode", "orthanc"} <= set(plain)
    # docker compose v2 leaves profiled services out; docker-compose 1.x lists them with
    # their profiles. Either way nothing of the monitoring profile starts by default.
    for name in ("prometheus", "grafana"):
        if name in plain:
            assert plain[name].get("profiles") == ["monitoring"], name

    services = _compose_config(compose, "monitoring")["services"]
    assert set(services) == {"orthonode", "orthanc", "prometheus", "grafana"}

    node = services["orthonode"]
    assert Path(node["build"]["context"]).resolve() == ROOT
    dockerfile = Path(node["build"]["dockerfile"])  # relative to the context, or absolute
    assert (dockerfile if dockerfile.is_absolute() else ROOT / dockerfile) == DEPLOY / "Dockerfile"
    assert _published(node) >= {11112, 8080}
    assert _binds(node)["/etc/orthonode/conf.yaml"].resolve() == DEPLOY / "docker" / "conf.yaml"
    assert any(
        (v.get("target") if isinstance(v, dict) else str(v).split(":")[1]) == "/var/lib/orthonode"
        for v in node["volumes"]
    ), "the spool must be a volume"

    orthanc = services["orthanc"]
    assert _published(orthanc) >= {4242, 8042}
    assert str(orthanc["environment"]["DICOM_WEB_PLUGIN_ENABLED"]).lower() == "true"
    orthanc_binds = {p.resolve() for p in _binds(orthanc).values()}
    assert DEPLOY / "orthanc" / "orthanc.json" in orthanc_binds
    assert DEPLOY / "orthanc" / "orthonode_forward.py" in orthanc_binds

    prometheus = {p.resolve() for p in _binds(services["prometheus"]).values()}
    assert {DEPLOY / "prometheus" / "prometheus.yml", DEPLOY / "prometheus" / "alerts.yml"} <= (
        prometheus
    )
    grafana = {p.resolve() for p in _binds(services["grafana"]).values()}
    assert {
        DEPLOY / "grafana" / "provisioning",
        DEPLOY / "grafana" / "orthonode-dashboard.json",
    } <= (grafana)


@pytest.mark.integration
def test_compose_mounts_files_that_exist(compose: list[str]) -> None:
    services = _compose_config(compose, "monitoring")["services"]
    missing = []
    for name, service in services.items():
        for target, source in _binds(service).items():
            source = source.resolve()
            assert source.is_relative_to(ROOT), f"{name} mounts {source}, outside the repository"
            if not source.exists():
                missing.append(f"{name}: {source.relative_to(ROOT)} -> {target}")
    assert not missing, "mounted files missing from the repository:\n" + "\n".join(missing)


def test_compose_monitoring_files_agree() -> None:
    """Without a compose tool: prometheus.yml scrapes the node and loads the alert rules where
    the compose file mounts them; Grafana's provisioning finds the mounted dashboard."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    prometheus_mounts = {
        v.split(":")[1]: v.split(":")[0] for v in raw["services"]["prometheus"]["volumes"]
    }
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for rule_file in scrape["rule_files"]:
        assert prometheus_mounts[rule_file] == "./prometheus/alerts.yml"
    assert prometheus_mounts["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"
    (job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "orthonode"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for c in job["static_configs"] for t in c["targets"]]
    assert targets == ["orthonode:8080"]
    alerts = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    assert 'up{job="orthonode"}' in alerts  # the job name the down-alert selects

    provisioning = DEPLOY / "grafana" / "provisioning"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "orthonode.yml").read_text())[
        "providers"
    ]
    grafana_mounts = {
        v.split(":")[1]: v.split(":")[0] for v in raw["services"]["grafana"]["volumes"]
    }
    dashboard_target = next(t for t, s in grafana_mounts.items() if s.endswith("dashboard.json"))
    assert Path(dashboard_target).parent == Path(provider["options"]["path"])
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"


# --- systemd ----------------------------------------------------------------------------------


def _unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.integration
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = system_tool("systemd-analyze")
    if analyze is None:
        _skip_or_fail("systemd-analyze is not installed")
    assert analyze is not None
    text = UNIT.read_text()
    exec_start = "ExecStart=/opt/orthonode/venv/bin/python -m dicom_node"
    assert text.count(exec_start) == 1
    # The installed venv does not exist here: point the copy at this interpreter (see above).
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(exec_start, f"ExecStart={sys.executable} -m dicom_node"))
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=120
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    problems = re.findall(r".*(?:Unknown|unknown|ignoring|Failed to parse|Invalid).*", output)
    assert not problems, "\n".join(problems)


@pytest.mark.integration
def test_systemd_sysusers_creates_the_user(tmp_path: Path) -> None:
    sysusers = system_tool("systemd-sysusers")
    if sysusers is None:
        _skip_or_fail("systemd-sysusers is not installed")
    assert sysusers is not None
    (tmp_path / "etc" / "sysusers.d").mkdir(parents=True)
    for name in ("passwd", "group"):
        (tmp_path / "etc" / name).touch()
    shutil.copy(DEPLOY / "systemd" / "orthonode.sysusers.conf", tmp_path / "etc/sysusers.d")
    result = subprocess.run(
        [sysusers, f"--root={tmp_path}", "--dry-run"], capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Creating user 'orthonode'" in output and "Creating group 'orthonode'" in output


def test_systemd_unit_hardening() -> None:
    unit = _unit_settings(UNIT.read_text())
    expected = {
        "Type": "simple",
        "User": "orthonode",
        "Group": "orthonode",
        "ExecStart": "/opt/orthonode/venv/bin/python -m dicom_node serve --config "
        "/etc/orthonode/conf.yaml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "StateDirectory": "orthonode",
        "Restart": "on-failure",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "no",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], f"{key}: {unit.get(key)}"
    assert "@system-service" in unit["SystemCallFilter"]
    assert "/var/lib/orthonode" in unit["ReadWritePaths"][0].split()
    assert int(unit["TimeoutStopSec"][0]) >= 60  # draining takes the step in hand


# --- the container's conf.yaml ----------------------------------------------------------------


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in os.environ:
        if key.startswith("ORTHONODE_"):
            monkeypatch.delenv(key)


@pytest.mark.usefixtures("clean_env")
def test_docker_conf_names_the_image_paths() -> None:
    config = load_config(DEPLOY / "docker" / "conf.yaml")
    assert (config.node.ae_title, config.node.port, config.node.http_port) == (
        "ORTHONODE",
        11112,
        8080,
    )
    assert [p.ae_title for p in config.peers] == ["ORTHANC"]
    assert [(d.ae_title, d.host, d.port) for d in config.destinations] == [
        ("ORTHANC", "orthanc", 4242)
    ]
    assert config.spool.directory == Path("/var/lib/orthonode/spool")
    assert set(config.tasks) == {"knee", "hip", "spine"}
    for name, task in config.tasks.items():
        assert task.enabled and task.bundle == IMAGE_WEIGHTS / name
        assert (ROOT / "weights" / name / "card.json").is_file()  # what the image copies
    assert config.routing.image_check_bundle == IMAGE_WEIGHTS / "image-check"


@pytest.mark.usefixtures("clean_env")
def test_docker_conf_bundles_load(tmp_path: Path) -> None:
    """What ``check-config`` does inside the image, with /opt/orthonode/weights standing for
    the repository's weights/ (the Dockerfiles copy that folder there)."""
    from dicom_node.applicability import load_image_checker
    from dicom_node.models.bundle import load_bundles

    text = (DEPLOY / "docker" / "conf.yaml").read_text()
    assert str(IMAGE_WEIGHTS) in text
    local = tmp_path / "conf.yaml"
    local.write_text(text.replace(str(IMAGE_WEIGHTS), str(ROOT / "weights")))
    config = load_config(local)
    assert set(load_bundles(config)) == {"knee", "hip", "spine"}
    load_image_checker(config.routing.image_check_bundle)


# --- Dockerfiles ------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    joined, current = [], ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#"):
            continue  # comments, also inside a continued instruction
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            joined.append(current.strip())
        current = ""
    steps = []
    for instruction in joined:
        op, _, args = instruction.partition(" ")
        steps.append((op.upper(), args.strip()))
    return steps


def _final_stage(path: Path) -> list[tuple[str, str]]:
    steps = _instructions(path)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def _pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"(torch|torchvision)==([\w.]+)", requirement.replace(" ", ""))
        if match:
            pins[match[1]] = match[2]
    assert set(pins) == {"torch", "torchvision"}
    return pins


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_static_facts(dockerfile: Path) -> None:
    steps = _instructions(dockerfile)
    final = _final_stage(dockerfile)

    users = [args for op, args in final if op == "USER"]
    assert users, "the runtime stage must switch to a dedicated user"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}

    (healthcheck,) = [args for op, args in final if op == "HEALTHCHECK"]
    assert "http://127.0.0.1:8080/healthz" in healthcheck

    exposed = {p.split("/")[0] for op, args in final if op == "EXPOSE" for p in args.split()}
    assert exposed >= {"11112", "8080"}

    assert json.loads(dict(final)["ENTRYPOINT"]) == ["python", "-m", "dicom_node"]
    assert json.loads(dict(final)["CMD"]) == ["serve", "--config", "/etc/orthonode/conf.yaml"]
    assert "/var/lib/orthonode" in dict(final)["VOLUME"]
    copies = [args.split()[-2:] for op, args in final if op == "COPY"]
    assert ["weights/", "/opt/orthonode/weights/"] in copies
    assert ["deploy/docker/conf.yaml", "/etc/orthonode/conf.yaml"] in copies

    # torch and torchvision: the versions pyproject.toml pins exactly, installed before the
    # project (so that `pip install .` keeps them).
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for op, a in steps if op == "ARG" and "=" in a}
    pins = _pins()
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["TORCHVISION_VERSION"] == pins["torchvision"]
    runs = [a for op, a in steps if op == "RUN"]
    torch_step = next(i for i, a in enumerate(runs) if "torch==${TORCH_VERSION}" in a)
    project_step = next(i for i, a in enumerate(runs) if re.search(r"pip install \.(\s|$)", a))
    assert "torchvision==${TORCHVISION_VERSION}" in runs[torch_step]
    assert torch_step < project_step
    if dockerfile.name == "Dockerfile":
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
        assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch_step]


def test_dockerignore_keeps_what_the_image_needs() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", "spool", "phantoms", ".venv", "venv", "**/__pycache__"} <= ignored
    needed = {"pyproject.toml", "README.md", "dicom_node", "train", "weights", "deploy"}
    needed |= {"deploy/docker", "deploy/docker/conf.yaml"}
    assert not needed & ignored


@pytest.mark.slow
def test_docker_image_builds() -> None:
    """Opt-in (ORTHONODE_TEST_DOCKER_BUILD=1; needs a Docker engine and the network): build
    the CPU image and run check-config inside it."""
    if os.environ.get("ORTHONODE_TEST_DOCKER_BUILD") != "1":
        pytest.skip("set ORTHONODE_TEST_DOCKER_BUILD=1 where a Docker engine runs")
    docker = require_tool("docker")
    if subprocess.run([docker, "info"], capture_output=True, timeout=60).returncode != 0:
        pytest.fail("ORTHONODE_TEST_DOCKER_BUILD=1 but no Docker engine answers `docker info`")
    tag = "orthonode:test-deploy-files"
    subprocess.run(
        [docker, "build", "-f", str(DEPLOY / "Dockerfile"), "-t", tag, str(ROOT)],
        check=True,
        timeout=3600,
    )
    result = subprocess.run(
        [docker, "run", "--rm", tag, "check-config", "--config", "/etc/orthonode/conf.yaml"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "configuration OK" in result.stdout
    user = subprocess.run(
        [docker, "run", "--rm", "--entrypoint", "id", tag, "-u"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert user.stdout.strip() not in {"", "0"}
