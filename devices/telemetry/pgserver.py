"""A private PostgreSQL server in a temporary directory on a loopback port (tests, benchmarks).

Real server, real process, like :mod:`devices.telemetry.mosquitto`: ``initdb`` + ``postgres``
from the Debian package ``postgresql``. PostgreSQL refuses to run as root, so under root the
server runs as the ``postgres`` system user (created by the package) via ``runuser``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from devices.telemetry.mosquitto import free_port
from runtime.errors import EdgeadaptError

SEARCH = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin", "/opt/homebrew/bin")


class PostgresMissing(EdgeadaptError):
    """initdb/postgres are not installed."""


def find_bindir() -> Path:
    """Directory with ``initdb`` and ``postgres`` (newest Debian version first)."""
    for pattern in SEARCH:
        for found in sorted(glob.glob(pattern), reverse=True):
            if os.access(Path(found) / "initdb", os.X_OK):
                return Path(found)
    which = shutil.which("initdb")
    if which:
        return Path(which).parent
    raise PostgresMissing(
        "PostgreSQL is not installed; run `make system-deps` (or apt-get install -y postgresql)"
    )


class PostgresServer:
    """One ``postgres`` process with trust authentication on 127.0.0.1:``port``."""

    def __init__(self, port: int | None = None):
        self.bindir = find_bindir()
        self.port = port or free_port()
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self.workdir = Path(tempfile.mkdtemp(prefix="edgeadapt-pg-"))
        self.datadir = self.workdir / "data"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, dbname: str = "postgres") -> str:
        """``postgresql://user@127.0.0.1:port/dbname``."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def start(self, timeout_s: float = 30.0) -> PostgresServer:
        """initdb (no fsync: a scratch server) and start; wait until it accepts connections."""
        if os.geteuid() == 0:
            uid = pwd.getpwnam("postgres").pw_uid
            os.chown(self.workdir, uid, -1)
        self._run_as([str(self.bindir / "initdb"), "-D", str(self.datadir), "-A", "trust",
                      "-U", self.user, "--no-sync", "-E", "UTF8"])  # fmt: skip
        log = open(self.workdir / "postgres.log", "ab")  # noqa: SIM115 (the server keeps it)
        self.proc = subprocess.Popen(
            self._as_user([str(self.bindir / "postgres"), "-D", str(self.datadir),
                           "-p", str(self.port), "-h", "127.0.0.1", "-k", str(self.workdir),
                           "-c", "fsync=off", "-c", "synchronous_commit=off",
                           "-c", "full_page_writes=off", "-c", "max_connections=200"]),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self._wait_ready(timeout_s)
        return self

    def create_database(self, name: str) -> str:
        """A fresh database; returns its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown, then remove the data directory."""
        if self.proc is not None and self.proc.poll() is None:
            # to the process group (the server runs in its own session): under root the child is
            # ``runuser``, which does not pass SIGINT on, so the server would wait out the timeout
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server log."""
        path = self.workdir / "postgres.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def _as_user(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd

    def _run_as(self, cmd: list[str]) -> None:
        res = subprocess.run(self._as_user(cmd), capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise EdgeadaptError(f"{Path(cmd[0]).name} failed: {res.stderr.strip()[-500:]}")

    def _wait_ready(self, timeout_s: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise EdgeadaptError(f"postgres exited at start:\n{self.log_tail()}")
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.1)
        self.stop()
        raise EdgeadaptError(f"postgres did not accept connections in {timeout_s}s")

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
