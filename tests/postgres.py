"""A throwaway PostgreSQL cluster started by the tests: ``initdb``, ``pg_ctl start``, a database.

The cluster lives in a fresh temporary folder (data, log and unix socket), listens on a free
127.0.0.1 port, and keeps the server's defaults, fsync included: what the tests see is what a
real deployment pays. Only ``initdb`` skips its own final sync of the new data folder
(``--no-sync``), which is thrown away afterwards. PostgreSQL refuses to run as root, so under
root every server command runs as the unprivileged ``postgres`` user that Debian's package
creates (``runuser -u postgres --``), and the folder is handed to that user. Every wait is
``pg_ctl -w`` with a ``-t`` deadline inside a subprocess timeout, never a fixed sleep.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.factories import free_port

__all__ = ["PostgresCluster", "PostgresError", "find_postgres_bin"]

SUPERUSER = "orthonode"
DATABASE = "orthonode"
SERVICE_USER = "postgres"  # created by Debian's postgresql-common
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 60
BIN_GLOB = "/usr/lib/postgresql/*/bin"


class PostgresError(RuntimeError):
    """The throwaway cluster could not be created, started or stopped; says where to look."""


def _version(folder: str) -> tuple[int, ...]:
    name = Path(folder).parent.name  # /usr/lib/postgresql/<version>/bin
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def find_postgres_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: the newest Debian server under
    /usr/lib/postgresql/<version>/bin (Debian keeps them off PATH), else PATH; None if neither."""
    candidates = [
        folder
        for folder in glob.glob(BIN_GLOB)
        if os.access(Path(folder, "initdb"), os.X_OK) and os.access(Path(folder, "pg_ctl"), os.X_OK)
    ]
    if candidates:
        return Path(max(candidates, key=_version))
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    return None


class PostgresCluster:
    """One PostgreSQL server in its own temporary folder; ``start()``, ``url``, ``stop()``.

    Parameters
    ----------
    bin_dir
        Folder with ``initdb`` and ``pg_ctl`` (see :func:`find_postgres_bin`).
    root
        Parent of the temporary folder (the system's temporary folder unless told). Under root
        it must be traversable by the ``postgres`` user: pytest's own ``tmp_path`` is not.
    """

    def __init__(self, bin_dir: Path, root: Path | None = None) -> None:
        self.bin_dir = bin_dir
        self.folder = Path(tempfile.mkdtemp(prefix="orthonode-pg-", dir=root))
        self.data = self.folder / "data"
        self.log_path = self.folder / "server.log"
        self.port = 0
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            try:
                service = pwd.getpwnam(SERVICE_USER)
            except KeyError as error:
                raise PostgresError(
                    f"running as root and there is no {SERVICE_USER!r} user to run PostgreSQL "
                    "as (Debian's postgresql package creates it)"
                ) from error
            os.chown(self.folder, service.pw_uid, service.pw_gid)
            self._prefix = [shutil.which("runuser") or "runuser", "-u", SERVICE_USER, "--"]

    @property
    def url(self) -> str:
        """``postgresql://orthonode@127.0.0.1:<port>/orthonode``: trust authentication."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, program: str, *args: str, timeout: float) -> None:
        command = [*self._prefix, str(self.bin_dir / program), *args]
        try:
            result = subprocess.run(
                command,
                cwd=self.folder,  # the postgres user may not be able to enter the caller's
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as error:
            raise PostgresError(f"{program} took over {timeout:.0f} s") from error
        if result.returncode != 0:
            output = (result.stderr or result.stdout)[-2000:]
            raise PostgresError(
                f"{program} failed ({result.returncode}): {output}"
                f"\n--- {self.log_path} ---\n{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no server log)"

    def start(self, attempts: int = 3) -> str:
        """Create the cluster, start it and create the database; returns :attr:`url`.

        A free port can be taken by someone else between asking and binding: the start is
        retried on another port, ``attempts`` times in all.
        """
        self._run(
            "initdb",
            "--pgdata",
            str(self.data),
            "--username",
            SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-sync",
            timeout=120,
        )
        base = (self.data / "postgresql.conf").read_text()
        for attempt in range(1, attempts + 1):
            self.port = free_port()
            settings = {
                "listen_addresses": "'127.0.0.1'",
                "port": str(self.port),
                "unix_socket_directories": f"'{self.folder}'",
                "max_connections": "40",
            }
            extra = "".join(f"{key} = {value}\n" for key, value in settings.items())
            (self.data / "postgresql.conf").write_text(base + "\n# tests/postgres.py\n" + extra)
            try:
                self._run(
                    "pg_ctl",
                    "start",
                    "--pgdata",
                    str(self.data),
                    "--log",
                    str(self.log_path),
                    "--wait",
                    "--timeout",
                    str(START_TIMEOUT_S),
                    timeout=START_TIMEOUT_S + 10,
                )
                break
            except PostgresError:
                if attempt == attempts:
                    raise
        self._create_database()
        return self.url

    def _create_database(self) -> None:
        import psycopg

        admin = f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as connection:
            exists = connection.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
            ).fetchone()
            if not exists:
                connection.execute(f'CREATE DATABASE "{DATABASE}"')

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``, waited for) and remove the folder."""
        try:
            # postmaster.pid, not a flag: a start that timed out may still have left a server.
            if (self.data / "postmaster.pid").exists():
                self._run(
                    "pg_ctl",
                    "stop",
                    "--pgdata",
                    str(self.data),
                    "--mode",
                    "fast",
                    "--wait",
                    "--timeout",
                    str(STOP_TIMEOUT_S),
                    timeout=STOP_TIMEOUT_S + 10,
                )
        finally:
            if not (self.data / "postmaster.pid").exists():
                shutil.rmtree(self.folder, ignore_errors=True)
