"""The field runner: the on-device control loop around a flashed bundle (no torch).

Each control period: read the (simulated) sensors, absorb the last transition into the belief,
act, step the plant, report telemetry through the persisted outbox, and check the deadline.

- **Safe mode**: an OOD alarm (or a ``set-mode safe`` command) switches the actions to a safe
  behaviour (``last_calm``, the default: the same policy with the adaptation state held at its
  value after the last calm transition, one whose surprise was below the warn level, i.e. the
  last state the monitor found in-distribution; the initial state before any calm step;
  ``prior``: the policy at the initial state, i.e. the non-adaptive policy; ``hold``: repeat
  the last action; ``zeros``: physical zero clipped to the bounds; ``adaptive``: monitor only,
  the adaptive action stays and the mode change is only reported). Every family declares its
  state by name, so ``last_calm`` holds a PEARL belief, an RL² hidden state or MAML's adapted
  weights alike. The adaptive state keeps updating, so the device returns to adaptive mode by
  itself once the alarm clears (after ``clear_steps`` calm steps) unless safe mode was
  commanded.
- **Task changes**: ``change_at`` switches the plant's task mid-episode (the wind shifts); the
  belief tracks it through the bundle's forgetting factor or a change-point reset.
- **Commands** arrive on the telemetry client's worker thread and are queued; the loop applies
  them between steps (the network never blocks the loop).
- **Shutdown**: SIGTERM/SIGINT end the loop after the current step; the outbox is flushed for
  up to ``drain_s`` and whatever is left stays on disk for the next boot.
"""

from __future__ import annotations

import collections
import logging
import signal
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field, replace
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal

import numpy as np

from devices.flash import boot
from devices.health import agent_config_for
from devices.profiles import load_profile
from devices.slots import device_profile_path, pubkey_path
from runtime.agent import Agent
from runtime.bundle import load_verified
from runtime.plugins import import_plugins
from runtime.tasks import make_family

log = logging.getLogger(__name__)

SafeBehaviour = Literal["last_calm", "prior", "hold", "zeros", "adaptive"]


class Mode(IntEnum):
    ADAPTIVE = 0
    SAFE = 1


@dataclass
class RunnerOptions:
    """What to run and how; defaults come from the device profile and the bundle."""

    device_root: Path
    sim: str | None = None  #: task family to simulate (default: the bundle's)
    split: str = "test"
    tasks: int = 1  #: tasks run one after the other (the belief resets between tasks)
    episodes: int = 3  #: episodes per task (the belief carries over)
    seed: int = 0
    task: np.ndarray | None = None  #: explicit task vector (overrides split sampling)
    change_at: int | None = None  #: global step at which the task changes
    change_task: np.ndarray | None = None  #: the task after the change (default: sampled)
    rate_hz: float | None = None  #: control rate (default: the device profile's)
    realtime: bool = True  #: sleep to the control period; False: as fast as possible
    safe: SafeBehaviour = "last_calm"
    clear_steps: int = 10  #: calm steps before leaving an OOD-triggered safe mode
    forget: float | None = None  #: belief forgetting factor (default: the bundle's)
    changepoint: Literal["off", "reset"] = "off"
    telemetry: Any = None  #: devices.telemetry.config.TelemetryConfig or None
    drain_s: float = 5.0  #: outbox flush time at shutdown (s)
    progress: bool = False


#: The per-step fields of a :class:`Trace` that :meth:`Trace.arrays` turns into float arrays
#: (with ``latency_us`` and ``mode``, what :meth:`Trace.trim` cuts).
_FLOAT_STEP_FIELDS = ("task", "episode", "reward", "action", "belief_mean", "belief_var", "ood",
                      "tracking_error_m")  # fmt: skip


@dataclass
class Trace:
    """Per-step record of a run, for reports and tests (numpy-friendly lists)."""

    task: list[list[float]] = field(default_factory=list)
    episode: list[int] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)
    action: list[list[float]] = field(default_factory=list)
    belief_mean: list[list[float]] = field(default_factory=list)
    belief_var: list[list[float]] = field(default_factory=list)
    ood: list[float] = field(default_factory=list)
    latency_us: list[float] = field(default_factory=list)
    mode: list[int] = field(default_factory=list)
    #: True distance to the reference (m) after each step, for families that track one
    #: (``env.tracking_error()``, e.g. drone-track); NaN for the others.
    tracking_error_m: list[float] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)  #: one per episode
    episode_task: list[int] = field(default_factory=list)  #: task index of each episode
    events: list[dict[str, Any]] = field(default_factory=list)
    missed_deadlines: int = 0
    stopped_early: bool = False

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-step fields as numpy arrays (for plots and ``np.savez``)."""
        out = {k: np.asarray(getattr(self, k), dtype=np.float64) for k in _FLOAT_STEP_FIELDS}
        out["latency_us"] = np.asarray(self.latency_us)
        out["mode"] = np.asarray(self.mode)
        out["returns"] = np.asarray(self.returns)
        return out

    def trim(self, keep: int) -> None:
        """Keep only the last ``keep`` per-step entries (a long run, e.g. a simulated fleet,
        must not grow without bound); per-episode entries, events and counters stay."""
        for name in (*_FLOAT_STEP_FIELDS, "latency_us", "mode"):
            del getattr(self, name)[:-keep]

    def summary(self) -> dict[str, Any]:
        """Counts, latencies and returns; with ``tracking_error_cm_by_episode`` (the mean true
        distance to the reference per episode, cm) for families that track one."""
        lat = np.asarray(self.latency_us) if self.latency_us else np.zeros(1)
        kinds = collections.Counter(e["type"] for e in self.events)
        return {
            **self._tracking_summary(),
            "steps": len(self.reward),
            "episodes": len(self.returns),
            "returns": [round(r, 3) for r in self.returns],
            "step_us_median": float(np.median(lat)),
            "step_us_p99": float(np.percentile(lat, 99)),
            "missed_deadlines": self.missed_deadlines,
            "safe_mode_steps": int(np.sum(self.mode)),
            "events": dict(kinds),
            "stopped_early": self.stopped_early,
        }

    def _tracking_summary(self) -> dict[str, list[float]]:
        cm = 100.0 * np.asarray(self.tracking_error_m, dtype=np.float64)
        if not len(cm) or not np.isfinite(cm).all():
            return {}
        episode = np.asarray(self.episode)
        by_episode = [round(float(cm[episode == e].mean()), 2) for e in np.unique(episode)]
        return {"tracking_error_cm_by_episode": by_episode}


class FieldRunner:
    """Boots the device root's active bundle and runs the control loop."""

    def __init__(self, opts: RunnerOptions) -> None:
        self.opts = opts
        self._load_agents()
        self.rate_hz = opts.rate_hz or self.profile.control_rate_hz
        import_plugins(self.agent.manifest.plugins, source=f"bundle {self.bundle}")
        self.env = make_family(opts.sim or self.agent.manifest.env, 1)
        self._tracking = getattr(self.env, "tracking_error", None)  # drone-track has one
        self.mode = Mode.ADAPTIVE
        self.commanded_safe = False
        self.calm = 0
        self.trace = Trace()
        self.telemetry = None
        self._commands: collections.deque[Any] = collections.deque()
        self._updates: collections.deque[Any] = collections.deque()
        self._stop = threading.Event()
        self._step = 0
        self._task: np.ndarray | None = None  # the plant's current task (set by run())

    def _load_agents(self) -> None:
        """Boot the active slot's bundle with the settings the health gate tested."""
        opts = self.opts
        root = Path(opts.device_root)
        self.bundle = boot(root)
        key = pubkey_path(root)
        self.profile = load_profile(device_profile_path(root))
        # The same runtime settings the flash health gate tested (providers, precision, cache).
        manifest = load_verified(self.bundle, key, require_signature=key is not None)
        base = agent_config_for(self.profile, manifest, root / "cache")
        providers = self.profile.execution_providers
        cfg = replace(base, forget=opts.forget, changepoint=opts.changepoint)
        self.agent = Agent(manifest, self.bundle, providers, cfg)
        # The safe policy: the same graphs with a state that never adapts (the initial one, or
        # the last calm state loaded when safe mode starts).
        self.safe_agent = (
            Agent(manifest, self.bundle, providers, replace(base, adaptive=False))
            if opts.safe in ("prior", "last_calm")
            else None
        )
        self._calm_state: dict[str, np.ndarray] | None = None  # last_calm: the held state

    # -- lifecycle ----------------------------------------------------------------------------
    def run(self) -> Trace:
        """Run every task and episode (or until SIGTERM); returns the trace."""
        for _ in self.steps():
            pass
        return self.trace

    def steps(self) -> Iterator[int]:
        """The run as a generator that yields the global step count after each control step.

        In real-time mode each step is paced to the control period before it yields; with
        ``realtime=False`` the caller paces (a fleet simulator steps many devices from one
        loop). Closing the generator early stops the run as :meth:`stop` does (telemetry is
        drained and closed).
        """
        self._install_signals()
        self._start_telemetry()
        try:
            rng = np.random.default_rng(self.opts.seed)
            for k, task in enumerate(self._tasks(rng)):
                self.agent.reset()
                self._forget_calm_state()
                # The plant's task: a mid-run change (``change_at``) persists into the
                # following episodes, as a wind shift would.
                self._task = np.asarray(task, dtype=np.float64)
                for _ in range(self.opts.episodes):
                    if self._stop.is_set():
                        self.trace.stopped_early = True
                        return
                    self.trace.returns.append((yield from self._episode(self._task, rng)))
                    self.trace.episode_task.append(k)
        finally:
            self._stop_telemetry()

    def stop(self) -> None:
        """Ask the loop to end after the current step (what SIGTERM does)."""
        self._stop.set()

    # -- the control loop ---------------------------------------------------------------------
    def _episode(self, task: np.ndarray, rng: np.random.Generator) -> Generator[int, None, float]:
        env, spec = self.env, self.env.spec
        obs = env.reset(task[None], rng)[0]
        self.agent.begin_episode()
        reward: float | None = None
        total = 0.0
        period = 1.0 / self.rate_hz
        next_tick = time.perf_counter() + period
        for _ in range(spec.horizon):
            if self._stop.is_set():
                break
            self._apply_commands()
            self._maybe_change_task(rng)
            t0 = time.perf_counter_ns()
            action = self._control(obs, reward)
            latency_us = (time.perf_counter_ns() - t0) / 1e3
            res = env.step(action[None])
            reward = float(res.reward[0])
            total += reward
            self._record(obs, action, reward, latency_us, self._tracking_error())
            obs = res.obs[0]
            self._step += 1
            next_tick = self._wait(next_tick, period)
            yield self._step
        self.agent.step(obs, reward, done=True)  # absorb the episode's last transition
        return total

    def _control(self, obs: np.ndarray, reward: float | None) -> np.ndarray:
        """The adaptive agent always absorbs evidence; safe mode only replaces the action."""
        action = self.agent.step(obs, reward)
        self._handle_agent_events()
        if self.mode is Mode.ADAPTIVE:
            self._remember_calm_state()
        elif self.safe_agent is not None:  # a state that never adapts (module docstring)
            action = self.safe_agent.act_scaled(obs)
        elif self.opts.safe == "zeros":
            low, high = self.agent._act_low, self.agent._act_high
            action = np.clip(np.zeros_like(low), low, high)
        elif self.opts.safe == "hold" and self.trace.action:
            action = np.asarray(self.trace.action[-1], dtype=np.float32)
        return action  # "adaptive": the adaptive action, safe mode only reported

    def _remember_calm_state(self) -> None:
        """``last_calm``: keep a copy of the state after a transition below the warn level."""
        if self.opts.safe == "last_calm" and self.agent.ood_score < self.agent.manifest.ood.warn:
            self._calm_state = self.agent.state

    def _forget_calm_state(self) -> None:
        """A new task (or a state reset): the safe policy's state back to the initial one."""
        self._calm_state = None
        if self.safe_agent is not None:
            self.safe_agent.reset_state()

    def _wait(self, next_tick: float, period: float) -> float:
        """Sleep to the next tick in real-time mode; count a missed deadline either way."""
        now = time.perf_counter()
        if self.trace.latency_us and self.trace.latency_us[-1] > self.profile.step_budget_us:
            self.trace.missed_deadlines += 1
        if not self.opts.realtime:
            return now + period
        if now > next_tick:
            self.trace.missed_deadlines += 1
            return now + period
        time.sleep(next_tick - now)
        return next_tick + period

    # -- modes, events, commands ------------------------------------------------------------
    def _handle_agent_events(self) -> None:
        for ev in self.agent.drain_events():
            self._event(
                ev.kind, {"step": self._step, "value": _finite(ev.value), "detail": ev.detail}
            )
            if ev.kind == "ood_alarm" and self.mode is Mode.ADAPTIVE:
                self._set_mode(Mode.SAFE, "ood_alarm")
        if self.mode is Mode.SAFE and not self.commanded_safe:
            calm = self.agent.ood_score < self.agent.manifest.ood.warn
            self.calm = self.calm + 1 if calm else 0
            if self.calm >= self.opts.clear_steps:
                self._set_mode(Mode.ADAPTIVE, "ood_cleared")

    def _set_mode(self, mode: Mode, reason: str) -> None:
        if mode is self.mode:
            return
        self.mode = mode
        self.calm = 0
        if mode is Mode.SAFE and self.safe_agent is not None and self._calm_state is not None:
            self.safe_agent.load_state(self._calm_state)
        self._event(
            "mode_change", {"mode": mode.name.lower(), "reason": reason, "step": self._step}
        )

    def _apply_commands(self) -> None:
        while self._commands:
            cmd = self._commands.popleft()
            if cmd.name in ("reset-state", "reset-belief"):
                self.agent.reset_state()
                self._forget_calm_state()
                self._event("state_reset", {"reason": "command", "step": self._step})
            elif cmd.name == "set-mode":
                self.commanded_safe = cmd.args.get("mode") == "safe"
                self._set_mode(Mode.SAFE if self.commanded_safe else Mode.ADAPTIVE, "command")
            elif cmd.name == "update-bundle":
                threading.Thread(target=self._update, args=(cmd,), daemon=True).start()
        while self._updates:
            self._switch_bundle(self._updates.popleft())

    def _update(self, cmd: Any) -> None:
        """Background thread: fetch, verify and flash (A/B + health gate) without stalling."""
        from devices.remote import remote_update

        root = Path(self.opts.device_root)
        try:
            result = remote_update(root, cmd.args["source"], cmd.args["sha256"], pubkey_path(root))
        except Exception as exc:  # a failed update must never stop the device
            log.exception("remote update failed")
            self._event("update_failed", {"source": cmd.args.get("source"), "error": repr(exc)})
            return
        self._updates.append(result)

    def _switch_bundle(self, result: Any) -> None:
        """Control loop: report the flash result; on success run the new bundle from now on."""
        self._event(*_result_event(result))
        if result.ok:
            self._load_agents()
            self._event("bundle_switched", {"bundle": str(self.bundle), "step": self._step})

    def _on_command(self, cmd: Any) -> dict[str, Any]:
        """Telemetry worker thread: queue for the control loop, acknowledge at once."""
        self._commands.append(cmd)
        return {"queued": True}

    def _maybe_change_task(self, rng: np.random.Generator) -> None:
        if self.opts.change_at is None or self._step != self.opts.change_at:
            return
        new = self.opts.change_task
        if new is None:
            new = self.env.sample_tasks(self.opts.split, 1, rng)[0]
        old = self.env.tasks[0].tolist()
        self._task = np.asarray(new, dtype=np.float64)
        self.env.set_tasks(self._task[None])
        self._event("task_change", {"step": self._step, "from": old, "to": list(map(float, new))})

    # -- telemetry ----------------------------------------------------------------------------
    def _tracking_error(self) -> float:
        """The plant's true distance to its reference (m) now, for families that track one;
        NaN for the others."""
        return float(self._tracking()[0]) if self._tracking is not None else float("nan")

    def _record(
        self,
        obs: np.ndarray,
        action: np.ndarray,
        reward: float,
        latency_us: float,
        tracking_error_m: float = float("nan"),
    ) -> None:
        b = self.agent.summary
        t = self.trace
        t.tracking_error_m.append(tracking_error_m)
        t.task.append(self.env.tasks[0].tolist())
        t.episode.append(len(t.returns))
        t.reward.append(reward)
        t.action.append(action.tolist())
        t.belief_mean.append(b.mean.tolist())
        t.belief_var.append(b.var.tolist())
        t.ood.append(self.agent.ood_score)
        t.latency_us.append(latency_us)
        t.mode.append(int(self.mode))
        if self.telemetry is not None:
            self.telemetry.record_step(
                self._step, reward, action, b.mean, b.var, b.entropy, b.count,
                self.agent.ood_score, latency_us,
            )  # fmt: skip

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        self.trace.events.append({"type": kind, **data})
        if self.telemetry is not None:
            self.telemetry.event(kind, data)

    def _start_telemetry(self) -> None:
        if self.opts.telemetry is None:
            return
        from devices.telemetry.client import BirthInfo, TelemetryClient

        m = self.agent.manifest
        birth = BirthInfo(
            bundle_id=m.bundle_id,
            bundle_version=m.version,
            profile=self.profile.name,
            algorithm=m.algorithm,
            summary_names=tuple(m.adaptation.summary_names),
            ood_warn=m.ood.warn,
            ood_alarm=m.ood.alarm,
        )
        self.telemetry = TelemetryClient(self.opts.telemetry, birth, self._on_command).start()

    def _stop_telemetry(self) -> None:
        if self.telemetry is not None:
            self.telemetry.close(drain_timeout_s=self.opts.drain_s)

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def _tasks(self, rng: np.random.Generator) -> list[np.ndarray]:
        if self.opts.task is not None:
            return [np.asarray(self.opts.task, dtype=np.float64)] * self.opts.tasks
        return list(self.env.sample_tasks(self.opts.split, self.opts.tasks, rng))


def _result_event(result: Any) -> tuple[str, dict[str, Any]]:
    event = result.to_event()
    kind = str(event.pop("type", "update_ok" if result.ok else "update_failed"))
    return kind, event


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
