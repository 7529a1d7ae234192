"""The field runner on a real flashed device root: loop, task change, commands, safe mode,
telemetry through a real Mosquitto, and SIGTERM of the real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from bundle_fixtures import cached_bundle, cached_keys
from mqtt_fixtures import wait_for

from devices.flash import flash
from devices.runner import FieldRunner, RunnerOptions
from devices.slots import init_device
from devices.telemetry.commands_proto import Command
from runtime.tasks import make_family

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def device_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = cached_bundle(tmp_path_factory)
    _, pub = cached_keys(tmp_path_factory)
    root = tmp_path_factory.mktemp("device") / "dev"
    init_device(root, "x86-cpu", pub)
    res = flash(bundle, root, health_start="spawn")
    assert res.ok, res.reason
    return root


def test_runs_every_step_with_finite_bounded_actions(device_root: Path) -> None:
    trace = FieldRunner(RunnerOptions(device_root, episodes=2, realtime=False)).run()
    spec = make_family("point-nav").spec
    a = trace.arrays()
    assert len(trace.reward) == 2 * spec.horizon
    assert len(trace.returns) == 2
    assert np.all(np.isfinite(a["action"]))
    assert np.all(a["action"] >= spec.act_low) and np.all(a["action"] <= spec.act_high)
    # The belief absorbed transitions: its variance shrank from the prior.
    assert np.all(a["belief_var"][-1] < a["belief_var"][0])
    assert trace.summary()["step_us_median"] > 0


def test_task_change_mid_episode_reaches_the_plant(device_root: Path) -> None:
    new = np.array([-1.0, 0.0])
    opts = RunnerOptions(device_root, episodes=1, realtime=False, change_at=7, change_task=new)
    trace = FieldRunner(opts).run()
    tasks = trace.arrays()["task"]
    assert not np.allclose(tasks[6], new)
    np.testing.assert_allclose(tasks[7], new)
    assert [e["step"] for e in trace.events if e["type"] == "task_change"] == [7]


def test_task_change_persists_into_the_next_episodes(device_root: Path) -> None:
    new = np.array([-1.0, 0.0])
    opts = RunnerOptions(device_root, episodes=2, realtime=False, change_at=7, change_task=new)
    trace = FieldRunner(opts).run()
    a = trace.arrays()
    second = a["task"][a["episode"] == 1]
    assert len(second) > 0
    np.testing.assert_allclose(second, np.broadcast_to(new, second.shape))


def _command(name: str, **args: str) -> Command:
    return Command(name, args, "f", "d", "0" * 16, time.time(), time.time() + 60, "k")


def test_set_mode_command_switches_to_safe_behaviour_and_back(device_root: Path) -> None:
    runner = FieldRunner(RunnerOptions(device_root, episodes=1, realtime=False, safe="zeros"))
    runner._on_command(_command("set-mode", mode="safe"))
    trace = runner.run()
    a = trace.arrays()
    assert np.all(a["mode"] == 1)
    np.testing.assert_allclose(a["action"], 0.0)  # zeros behaviour: physical zero
    runner._on_command(_command("set-mode", mode="adaptive"))
    assert np.all(runner.run().arrays()["mode"][20:] == 0)


def test_adaptive_safe_behaviour_only_reports_safe_mode(device_root: Path) -> None:
    """``--safe adaptive`` (monitor only): in safe mode the actions are the adaptive ones, the
    mode is still recorded; the CLI offers every behaviour the runner has."""
    from typing import get_args

    from devices.field_commands import SAFE_CHOICES
    from devices.runner import SafeBehaviour

    assert get_args(SafeBehaviour) == SAFE_CHOICES
    plain = FieldRunner(RunnerOptions(device_root, episodes=1, realtime=False)).run().arrays()
    runner = FieldRunner(RunnerOptions(device_root, episodes=1, realtime=False, safe="adaptive"))
    runner._on_command(_command("set-mode", mode="safe"))
    a = runner.run().arrays()
    assert np.all(a["mode"] == 1) and np.all(plain["mode"] == 0)
    np.testing.assert_array_equal(a["action"], plain["action"])
    held = FieldRunner(RunnerOptions(device_root, episodes=1, realtime=False, safe="hold"))
    held._on_command(_command("set-mode", mode="safe"))
    assert not np.array_equal(held.run().arrays()["action"], plain["action"])


def test_last_calm_safe_mode_holds_the_state_of_the_last_calm_step(device_root: Path) -> None:
    """Safe mode (``last_calm``, the default) acts with the adaptive state held at its value
    before safe mode began, not the initial one, while the adaptive state keeps updating; a new
    task brings the held state back to the initial one."""
    runner = FieldRunner(RunnerOptions(device_root, tasks=2, episodes=1, realtime=False))
    horizon, calm, safe = runner.env.spec.horizon, 8, 6
    steps = runner.steps()
    for _ in range(calm):
        next(steps)
    assert runner.agent.ood_score < runner.agent.manifest.ood.warn  # the last step was calm
    before = runner.agent.state
    runner._on_command(_command("set-mode", mode="safe"))
    for _ in range(safe):
        next(steps)
    initial = {s.name: s.initial(runner.bundle)[None] for s in runner.agent.adaptation.state}
    held = runner.safe_agent.state
    for name, value in before.items():
        np.testing.assert_array_equal(held[name], value)
        assert not np.array_equal(value, initial[name])  # not the prior
        assert not np.array_equal(runner.agent.state[name], value)  # adaptation goes on
    assert runner.trace.mode == [0] * calm + [1] * safe
    for _ in range(horizon - calm - safe + 1):  # the first step of the second task
        next(steps)
    for name, value in runner.safe_agent.state.items():
        np.testing.assert_array_equal(value, initial[name])
    steps.close()


def test_reset_belief_command_returns_the_belief_to_the_prior(device_root: Path) -> None:
    runner = FieldRunner(RunnerOptions(device_root, episodes=1, realtime=False))
    runner.run()
    assert runner.agent.belief.count > 0
    runner._on_command(_command("reset-belief"))
    runner._apply_commands()
    assert runner.agent.belief.count == 0
    assert any(e["type"] == "state_reset" for e in runner.trace.events)


def test_telemetry_reaches_the_collector_without_loss(device_root: Path, collector) -> None:
    from devices.telemetry.collector_db import connect, device_stats
    from devices.telemetry.config import TelemetryConfig

    tele = TelemetryConfig(
        broker=collector.broker.url,
        fleet="test",
        device="runner-1",
        outbox=str(device_root.parent / "outbox.sqlite"),
    )
    opts = RunnerOptions(device_root, episodes=2, realtime=False, telemetry=tele)
    trace = FieldRunner(opts).run()

    def stored() -> int:
        with connect(collector.db_path, readonly=True) as conn:
            return device_stats(conn).get("runner-1", {}).get("received", 0)

    wait_for(lambda: stored() >= len(trace.reward), 10, "telemetry in the collector database")
    with connect(collector.db_path, readonly=True) as conn:
        st = device_stats(conn)["runner-1"]
    assert st["gaps"] == 0


def test_sigterm_stops_the_real_process_cleanly(device_root: Path) -> None:
    cmd = [sys.executable, "-m", "runtime.cli", "run", "--device-root", str(device_root),
           "--episodes", "1000", "--rate", "50", "--json"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ), cwd=ROOT)  # fmt: skip
    time.sleep(3.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["stopped_early"] is True
    assert summary["steps"] > 10


def test_update_bundle_command_flashes_the_other_slot_and_switches(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from bundle_fixtures import make_run

    from devices.remote import pack_bundle
    from devices.slots import device_status
    from export.bundle_writer import ExportOptions, export_bundle

    private, pub = cached_keys(tmp_path_factory)
    root = tmp_path / "dev"
    init_device(root, "x86-cpu", pub)
    assert flash(cached_bundle(tmp_path_factory), root, health_start="spawn").ok
    new = export_bundle(
        make_run(tmp_path / "run2", seed=1), tmp_path / "b2", ExportOptions(key=private)
    )
    sha = pack_bundle(new.bundle_dir, tmp_path / "b2.tar.gz")
    runner = FieldRunner(RunnerOptions(root, episodes=1, realtime=False))
    runner._on_command(_command("update-bundle", source=str(tmp_path / "b2.tar.gz"), sha256=sha))
    runner._apply_commands()  # starts the background flash
    wait_for(lambda: bool(runner._updates), 60, "the background update")
    runner.run()
    kinds = [e["type"] for e in runner.trace.events]
    assert "update_ok" in kinds and "bundle_switched" in kinds
    assert runner.agent.manifest.bundle_id == new.manifest.bundle_id
    assert device_status(root)["active_slot"] == "B"


def test_update_bundle_with_a_wrong_digest_is_refused_and_the_device_keeps_running(
    tmp_path: Path, device_root: Path
) -> None:
    runner = FieldRunner(RunnerOptions(device_root, episodes=1, realtime=False))
    before = runner.agent.manifest.bundle_id
    runner._on_command(
        _command("update-bundle", source=str(tmp_path / "nope.tar.gz"), sha256="0" * 64)
    )
    runner._apply_commands()

    def finished() -> bool:
        return bool(runner._updates) or any(
            e["type"] == "update_failed" for e in runner.trace.events
        )

    wait_for(finished, 60, "the failed update")
    trace = runner.run()
    assert any(e["type"] == "update_failed" for e in trace.events)
    assert runner.agent.manifest.bundle_id == before
    assert len(trace.reward) > 0
