"""A private Mosquitto broker process on a loopback port (tests, benchmarks, demos).

Real broker, real process: it can be killed with SIGKILL and restarted on the same port with the
same persistence directory, which is what the fault tests do.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from runtime.errors import EdgeadaptError

log = logging.getLogger(__name__)

SEARCH_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


class MosquittoMissing(EdgeadaptError):
    """The mosquitto binary is not installed."""


def find_mosquitto() -> str:
    """Path of the mosquitto binary, or raise :class:`MosquittoMissing` saying how to install it."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for path in SEARCH_PATHS:
        if os.access(path, os.X_OK):
            return path
    raise MosquittoMissing(
        "mosquitto is not installed; run `make system-deps` "
        "(or `sudo apt-get install -y mosquitto`)"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def basic_config(port: int, data_dir: Path, *, save_on_every_change: bool = True) -> str:
    """Anonymous loopback listener with persistence (sessions and retained messages survive).

    Mosquitto writes its persistence file only on autosave and on clean shutdown; saving on every
    change makes a SIGKILL lose nothing that was already stored for an offline session.
    """
    autosave = (
        "autosave_on_changes true\nautosave_interval 1"
        if save_on_every_change
        else ("autosave_interval 1")
    )
    return (
        f"{run_as_self()}"
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence true\n"
        f"persistence_location {data_dir}/\n"
        f"{autosave}\n"
        "max_queued_messages 0\n"
        "max_inflight_messages 0\n"
        "log_type error\nlog_type warning\nlog_type notice\n"
        "log_dest stderr\n"
    )


def run_as_self() -> str:
    """Config line that keeps a root-started broker from switching to user ``mosquitto``
    (which could not write to our private directories)."""
    return "user root\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""


class Mosquitto:
    """One mosquitto process with a config file in ``workdir``; restartable on the same port."""

    def __init__(self, workdir: str | Path, config: str | None = None, port: int | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.config_text = config or basic_config(self.port, self.workdir)
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT``."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the broker and wait until it accepts TCP connections."""
        self.config_path.write_text(self.config_text)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [find_mosquitto(), "-c", str(self.config_path)],
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready(timeout_s)

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no final persistence save."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: clean shutdown (mosquitto saves its persistence file)."""
        self._signal(signal.SIGTERM)

    def restart(self, timeout_s: float = 10.0) -> None:
        """Start again on the same port with the same config and persistence directory."""
        self.start(timeout_s)

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the broker log (for error messages)."""
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise EdgeadaptError(f"mosquitto exited at start:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.kill()
        raise EdgeadaptError(f"mosquitto did not listen on {self.port} in {timeout_s}s")

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
