"""The flashing health gate: load a staged bundle in a child process and prove it works.

The child (``python -m devices.health BUNDLE --profile PROFILE``) loads the bundle with the
device's execution providers, runs the manifest's test vectors (``Agent.self_test``), measures
the median step latency and its own peak memory, checks them against the device profile and
prints one JSON line. The parent (:func:`run_health_gate`) enforces a timeout and turns any crash,
hang or malformed answer into a failed :class:`HealthSummary`: a bundle that segfaults
onnxruntime, hangs, or misses the budget never becomes active.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

from devices.profiles import DeviceProfile, check_budget, load_profile
from devices.slots import HealthSummary, close_inherited_locks

if TYPE_CHECKING:
    from runtime.agent import AgentConfig
    from runtime.bundle import Manifest

log = logging.getLogger(__name__)

#: Last line of stdout the child prints, prefixed so that stray library output cannot pass for
#: a result.
RESULT_PREFIX = "EDGEADAPT-HEALTH "
StartMethod = Literal["spawn", "fork"]


def run_health_gate(
    bundle_dir: Path,
    profile_path: Path,
    pubkey: Path | None,
    timeout_s: float,
    cache_dir: Path | None = None,
    on_started: Callable[[], None] | None = None,
    start_method: StartMethod = "spawn",
) -> HealthSummary:
    """Run the gate in a child process; never raises for a failing bundle.

    ``timeout_s`` bounds the whole child (s); ``cache_dir`` holds TensorRT engines built on the
    device; ``on_started`` is called once the child runs (a test hook for crash injection).
    ``start_method`` "spawn" starts a fresh interpreter (``python -m devices.health``: nothing
    inherited, safe from a multi-threaded runner); "fork" forks this process, which skips the
    interpreter start and imports (fast; only for single-threaded callers such as tests); a
    forked gate cannot measure the bundle's memory (it shares its parent's pages), so it checks
    the test vectors and the latency budget only and reports ``rss_mb`` as None.
    """
    forked = start_method == "fork"
    args = GateArgs(bundle_dir, profile_path, pubkey, cache_dir, os.getpid(), not forked)
    start = time.perf_counter()
    if start_method == "fork":
        return _run_forked(args, timeout_s, on_started, start)
    return _run_spawned(args, timeout_s, on_started, start)


class GateArgs(NamedTuple):
    """What the gate child needs."""

    bundle_dir: Path
    profile_path: Path
    pubkey: Path | None
    cache_dir: Path | None
    parent_pid: int
    #: False in a forked child: its resident set includes the pages it shares with its parent,
    #: so its peak RSS says nothing about the bundle.
    measure_memory: bool = True


def check_bundle(
    bundle_dir: Path,
    profile_path: Path,
    pubkey: Path | None,
    cache_dir: Path | None = None,
    measure_memory: bool = True,
) -> HealthSummary:
    """The gate itself, in this process: load, self-test, latency and memory budgets."""
    from runtime.agent import Agent
    from runtime.bundle import load_verified

    start = time.perf_counter()
    profile = load_profile(profile_path)
    manifest = load_verified(bundle_dir, pubkey, require_signature=pubkey is not None)
    agent = Agent(
        manifest,
        bundle_dir,
        providers=list(profile.execution_providers),
        config=agent_config_for(profile, manifest, cache_dir),
    )
    report = agent.self_test()
    rss_mb = peak_rss_mb() if measure_memory else None
    reasons = list(report.reasons)
    if not report.passed and not reasons:
        reasons.append("self-test failed")
    reasons += check_budget(profile, step_us=report.step_us_median, rss_mb=rss_mb)
    return HealthSummary(
        passed=report.passed and not reasons,
        max_abs_err=report.max_abs_err,
        step_us_median=report.step_us_median,
        rss_mb=rss_mb,
        duration_s=time.perf_counter() - start,
        reasons=reasons,
    )


def agent_config_for(
    profile: DeviceProfile, manifest: Manifest, cache_dir: Path | None = None
) -> AgentConfig:
    """The runtime settings a device with ``profile`` runs ``manifest`` with.

    The health gate and the field runner use the same settings, so the gate tests what will run:
    the INT8 step graph when the profile prefers int8 and the bundle ships it, TensorRT FP16
    when the profile prefers fp16, and a TensorRT engine cache under ``cache_dir``.
    """
    from runtime.agent import STEP_GRAPHS, AgentConfig
    from runtime.providers import SessionTuning

    int8 = profile.precision == "int8" and STEP_GRAPHS["int8"] in manifest.graphs
    tuning = SessionTuning(
        fp16=profile.precision == "fp16",
        trt_cache_dir=str(cache_dir / "trt") if cache_dir is not None else None,
    )
    return AgentConfig(precision="int8" if int8 else "fp32", tuning=tuning)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB).

    On Linux this reads ``VmHWM`` from /proc: ``ru_maxrss`` survives ``execve``, so a gate
    spawned from a large parent (a trainer with torch loaded) would report the parent's peak.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / (1024.0 * 1024.0)


# -- child process ---------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Entry point of the spawned child: print one ``RESULT_PREFIX`` JSON line, exit 0 if passed."""
    parser = argparse.ArgumentParser(prog="python -m devices.health")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--profile", type=Path, required=True)
    parser.add_argument("--pubkey", type=Path, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    ns = parser.parse_args(argv)
    args = GateArgs(ns.bundle, ns.profile, ns.pubkey, ns.cache_dir, ns.parent_pid)
    summary = _child_gate(args)
    print(RESULT_PREFIX + summary.model_dump_json(), flush=True)
    return 0 if summary.passed else 1


def _child_gate(args: GateArgs) -> HealthSummary:
    _die_with_parent(args.parent_pid)
    try:
        return check_bundle(
            args.bundle_dir, args.profile_path, args.pubkey, args.cache_dir, args.measure_memory
        )
    except Exception as exc:  # any load or run error is a failed gate, reported as such
        return HealthSummary(passed=False, reasons=[f"{type(exc).__name__}: {exc}"])


def _run_spawned(
    args: GateArgs, timeout_s: float, on_started: Callable[[], None] | None, start: float
) -> HealthSummary:
    cmd = [sys.executable, "-m", "devices.health", str(args.bundle_dir)]
    cmd += ["--profile", str(args.profile_path), "--parent-pid", str(args.parent_pid)]
    if args.pubkey is not None:
        cmd += ["--pubkey", str(args.pubkey)]
    if args.cache_dir is not None:
        cmd += ["--cache-dir", str(args.cache_dir)]
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env()
    ) as child:
        if on_started is not None:
            on_started()
        try:
            out, err = child.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            return _failed(f"health gate timed out after {timeout_s:g} s", start)
    return _parse_result(child.returncode, out, err, start)


def _run_forked(
    args: GateArgs, timeout_s: float, on_started: Callable[[], None] | None, start: float
) -> HealthSummary:
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_forked_main, args=(sender, args), daemon=True)
    child.start()
    sender.close()
    if on_started is not None:
        on_started()
    try:
        if not receiver.poll(timeout_s):
            child.kill()
            child.join()
            return _failed(f"health gate timed out after {timeout_s:g} s", start)
        payload = receiver.recv_bytes()
    except EOFError:  # the child died without answering
        child.join()
        return _failed(f"health gate child died (exit code {child.exitcode})", start)
    finally:
        receiver.close()
    child.join()
    return HealthSummary.model_validate_json(payload)


def _forked_main(sender: Connection, args: GateArgs) -> None:
    close_inherited_locks()
    sender.send_bytes(_child_gate(args).model_dump_json().encode())
    sender.close()


def _die_with_parent(parent_pid: int | None) -> None:
    """Ask Linux to SIGKILL this child when the flashing process dies (no orphan gates)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(3)  # the parent died before prctl took effect


# -- helpers ---------------------------------------------------------------------------------
def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # One thread per library: the gate measures single-sample latency as the runner sees it.
    env.setdefault("OMP_NUM_THREADS", "1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _parse_result(returncode: int, out: str, err: str, start: float) -> HealthSummary:
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_PREFIX):
            try:
                return HealthSummary.model_validate_json(line[len(RESULT_PREFIX) :])
            except ValueError:
                break
    tail = (err.strip().splitlines() or ["no output"])[-1]
    if returncode < 0:
        return _failed(f"health gate child killed by signal {-returncode} ({tail})", start)
    return _failed(f"health gate child exited {returncode} without a result ({tail})", start)


def _failed(reason: str, start: float) -> HealthSummary:
    log.warning("health gate failed: %s", reason)
    return HealthSummary(passed=False, duration_s=time.perf_counter() - start, reasons=[reason])


if __name__ == "__main__":
    sys.exit(main())
