"""Shared fixtures: small phantom sets generated once per test session, a throwaway PostgreSQL,
and tool lookup."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from train.synth.generate import SynthOptions, generate


def system_tool(name: str) -> str | None:
    """Path of an installed program, never one of the virtual environment's scripts: pynetdicom
    installs its own ``storescu``/``echoscu`` there, and the tests mean dcmtk's."""
    scripts = {Path(sys.prefix, "bin").resolve(), Path(sys.executable).parent.resolve()}
    search = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    path = os.pathsep.join(p for p in search if Path(p).resolve() not in scripts)
    return shutil.which(name, path=path)


def require_tool(name: str) -> str:
    """Path of an external tool; skip without it, but fail under CI=true (CI must have it)."""
    path = system_tool(name)
    if path:
        return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{name} is not installed, and CI=true requires it (.ci/run installs it)")
    pytest.skip(f"{name} not installed (set CI=true to make this a failure)")


def make_set(root: Path, name: str, **kwargs: object) -> Path:
    """Generate a phantom set under ``root/name`` (256 px unless told) and return its folder."""
    out = root / name
    options = {"rows": 256, "cols": 256, **kwargs}
    generate(SynthOptions(out=out, **options))  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="session")
def phantom_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small default set per task: knee (12 patients), hip (8), spine (14)."""
    root = tmp_path_factory.mktemp("phantoms")
    return {
        "knee": make_set(root, "knee", task="knee", patients=12, seed=3),
        "hip": make_set(root, "hip", task="hip", patients=8, seed=3),
        "spine": make_set(root, "spine", task="spine", patients=14, seed=3),
    }


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL (tests/postgres.py) for the session: its ``postgresql://`` URL.

    Skipped without the server's binaries, but a failure under CI=true (.ci/run installs them).
    """
    from tests.postgres import PostgresCluster, find_postgres_bin

    bin_dir = find_postgres_bin()
    if bin_dir is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("PostgreSQL (initdb, pg_ctl) is not installed, and CI=true requires it")
        pytest.skip(
            "PostgreSQL (initdb, pg_ctl) not installed (set CI=true to make this a failure)"
        )
    cluster = PostgresCluster(bin_dir)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
