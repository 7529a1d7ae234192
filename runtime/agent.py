"""The on-device agent: a verified bundle, its adaptation state and safe actions (numpy + ORT).

:class:`Agent` is the algorithm-neutral safety shell around whatever meta-RL family a bundle
holds. The family is a declaration (:mod:`runtime.adaptation`): named state tensors with
initial values, params, and two graphs paired with them by name. The shell never looks at the
algorithm: it validates input, keeps each agent's state, feeds the graphs, refuses non-finite
or out-of-bounds input and updates, returns fallbacks, clamps actions, raises OOD and
change-point events and batches ``batch`` agents (1 on a drone, N in a simulator or a fleet).

Per transition it makes one call to the bundle's fused step graph, which absorbs the transition
into the state (O(1) time and memory whatever the context length: a belief's natural
parameters, a recurrent hidden state) and returns the action for the next observation; the
following :meth:`Agent.act` on that observation returns the cached action without another call.
Episode boundaries are part of the API: ``observe(..., done=True)`` marks the last transition of
an episode (families that declare a ``done`` input see it); the state persists across the
episodes of a task until :meth:`Agent.reset`.

Two action conventions, on purpose:

- :meth:`Agent.act` / :meth:`Agent.observe` follow :class:`runtime.evaluation.AdaptivePolicy`:
  actions are *normalized* to [-1, 1] (what the encoder was trained on; ``rollout`` scales them).
- :meth:`Agent.act_scaled` and :meth:`Agent.step` return *physical* actions within the family's
  bounds, for device control loops (``step`` keeps the previous obs and action itself).

Bad input never poisons the state: a wrong shape or dtype raises :class:`InputError` naming the
argument and what was expected; a NaN/inf observation, action or reward, or an observation beyond
the manifest's bounds plus its margin, skips the transition (counted in ``summary.skipped``),
raises an event and, where an action is needed, returns the configured safe fallback. A
transition whose surprise is far beyond the calibrated alarm level (``outlier_factor``) is not
absorbed unless such transitions persist (a real change, not a glitch). Returned actions are
always finite and within bounds.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from runtime.adaptation import STATE_OUT_SUFFIX, Summary
from runtime.bundle import Manifest, load_verified
from runtime.episodic import EpisodeBuffer, ExplorationNoise
from runtime.errors import EdgeadaptError
from runtime.ood import Event, OODMonitor
from runtime.providers import SessionTuning
from runtime.session import GraphSession

if TYPE_CHECKING:
    from runtime.evaluation import EvalReport

log = logging.getLogger(__name__)

Fallback = Literal["zeros", "hold", "policy"]
_F32 = np.dtype(np.float32)  # native float32 (``dtype is _F32`` is the fast input check)
STEP_GRAPHS = {"fp32": "step", "int8": "step_int8"}
ACT_GRAPH = "act"


class InputError(EdgeadaptError, ValueError):
    """An observation, action or reward has the wrong shape or dtype."""


@dataclass(frozen=True)
class AgentConfig:
    """How the runtime behaves; every field has a safe default."""

    #: PEARL's forgetting factor in (0, 1]; None = the bundle's default. < 1 tracks changing
    #: tasks. Shorthand for ``params={"forget": ...}``; refused for families without it.
    forget: float | None = None
    #: Values of the family's declared params (name -> value); others keep their defaults.
    params: dict[str, float] = field(default_factory=dict)
    #: Safe action when the observation is not finite: "zeros" (physical 0, clipped to bounds),
    #: "hold" (the last action returned) or "policy" (the policy at the last finite observation).
    fallback: Fallback = "hold"
    #: "reset": reset an agent's adaptation state after ``changepoint_patience`` consecutive
    #: steps with surprise above the alarm threshold. "off": only raise events.
    changepoint: Literal["off", "reset"] = "off"
    changepoint_patience: int = 3
    #: A transition whose surprise exceeds ``outlier_factor`` x the calibrated alarm level is
    #: not absorbed (a glitch must not ruin the task), unless such transitions persist: the
    #: ``outlier_patience``-th in a row and those after it are absorbed (the world changed).
    #: None: absorb everything.
    outlier_factor: float | None = 100.0
    outlier_patience: int = 3
    #: Step graph precision: "fp32" or "int8" (the bundle must contain the INT8 variant).
    precision: Literal["fp32", "int8"] = "fp32"
    #: False: never update the adaptation state (the non-adaptive reference).
    adaptive: bool = True
    #: Bind pre-allocated buffers once (IOBinding) instead of passing arrays to every run().
    iobinding: bool = True
    tuning: SessionTuning = field(default_factory=SessionTuning)
    #: Graph calls at load so the first control step is not the slow one.
    warmup: int = 20
    #: Events kept for :meth:`Agent.drain_events` (oldest dropped first).
    max_events: int = 1024
    #: Seed of the exploration noise of stochastic families (MAML), restarted at every task.
    seed: int = 0
    #: Guards on an episodic adaptation's statistics (output name -> largest allowed value),
    #: e.g. ``{"step_norm": 5.0}``: an inner step that moves the weights further is refused
    #: (event ``adapt_rejected``) and the old weights are kept.
    adapt_limits: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AdaptationSummary:
    """What each agent has adapted to (batch axis dropped for a single agent).

    ``mean``: the family's summary vector (PEARL: the belief mean; RL²: a projection of the
    hidden state); ``var``: its spread (PEARL's marginal variance; empty otherwise);
    ``entropy``: nats (NaN where the family has none).
    """

    algorithm: str
    mean: np.ndarray  # (S,) or (B, S)
    var: np.ndarray
    entropy: float | np.ndarray  # nats
    count: int | np.ndarray  # transitions absorbed since reset
    skipped: int | np.ndarray  # transitions refused (non-finite, out of bounds, outlier)


#: The name it had when PEARL was the only family.
BeliefState = AdaptationSummary


@dataclass
class SelfTestReport:
    """On-device self-test: test vectors through onnxruntime, then timed steps."""

    passed: bool
    max_abs_err: float
    step_us_median: float
    reasons: list[str] = field(default_factory=list)


@dataclass
class _StateSlot:
    """One declared state tensor: the step graph's input and output buffers, the act graph's
    input buffer and one agent's initial value."""

    name: str
    step_in: np.ndarray
    step_out: np.ndarray
    act_in: np.ndarray | None
    init: np.ndarray


class Agent:
    """``batch`` adaptive agents driven by a bundle's step and act graphs."""

    def __init__(
        self,
        manifest: Manifest,
        bundle_dir: str | Path,
        providers: list[str] | None = None,
        config: AgentConfig | None = None,
    ) -> None:
        self.manifest = manifest
        self.adaptation = manifest.adaptation
        self.bundle_dir = Path(bundle_dir)
        self.config = config or AgentConfig()
        self.graph_name = STEP_GRAPHS[self.config.precision]
        self.param_values = self._param_values()
        self.session = self._session(self.graph_name, providers)
        # INT8 graphs quantize activations per call over the whole batch: a NaN in one row
        # would poison every row, so non-finite rows are zeroed before those calls.
        self._sanitize = self.session.spec.precision == "int8"
        self.act_session = self._session(ACT_GRAPH, providers)
        self._obs_dim, self._act_dim = manifest.obs.dim, manifest.act.dim
        self._act_low = np.asarray(manifest.act.low, dtype=np.float32)
        self._act_high = np.asarray(manifest.act.high, dtype=np.float32)
        self._half = (self._act_high - self._act_low) / 2.0
        self._zero_norm = _zero_action(self._act_low, self._half)
        self._obs_lo, self._obs_hi = _obs_limits(manifest)
        # The same limits over a whole transition row (action and reward: finite only), so one
        # comparison pair checks a step: 2 µs instead of 5 at batch 1.
        big = np.finfo(np.float32).max
        free = np.full(self._act_dim + 1, big, dtype=np.float32)
        lo, hi = np.maximum(self._obs_lo, -big), np.minimum(self._obs_hi, big)
        self._row_lo = np.concatenate([lo, -free, lo])
        self._row_hi = np.concatenate([hi, free, hi])
        self._warn = float(manifest.ood.warn)
        f = self.config.outlier_factor
        self._outlier = float("inf") if f is None else float(f) * float(manifest.ood.alarm)
        self.events: collections.deque[Event] = collections.deque(maxlen=self.config.max_events)
        self.on_event: Callable[[Event], None] | None = None
        ad = self.adaptation
        self._noise = ExplorationNoise(ad.noise, self.config.seed) if ad.noise else None
        self._episodes = None
        if ad.episodic is not None and self.config.adaptive:
            self._episodes = EpisodeBuffer(
                ad.episodic, manifest, self.bundle_dir, self.providers, self._obs_dim,
                self._act_dim, self.config.adapt_limits,
            )  # fmt: skip
        self.batch = 0
        self.reset(1)
        self._warm_up()

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        bundle_dir: str | Path,
        pubkey: str | Path | bytes | None = None,
        require_signature: bool = False,
        providers: list[str] | None = None,
        config: AgentConfig | None = None,
    ) -> Agent:
        """Verify a bundle (hashes, signature when a key is given, schema, runtime version)
        and build an agent on the best available execution providers."""
        manifest = load_verified(bundle_dir, pubkey, require_signature)
        return cls(manifest, bundle_dir, providers, config)

    @property
    def algorithm(self) -> str:
        return self.adaptation.algorithm

    # -- AdaptivePolicy ----------------------------------------------------------------------
    def begin_task(self, tasks_BK: np.ndarray) -> None:
        """Protocol hook: one agent per task, state back to its initial value (tasks unread)."""
        self.reset(len(tasks_BK))

    def begin_episode(self) -> None:
        """Protocol hook: a new episode of the same task starts. The adaptation state carries
        over; only the previous observation kept by :meth:`step` is dropped."""
        self._prev_obs = None

    def reset(self, batch: int | None = None) -> None:
        """Forget everything (new task): state back to its initial value; optionally a new
        batch size."""
        batch = self.batch if batch is None else int(batch)
        if batch != self.batch:
            self.session.resize(batch)
            self.act_session.resize(batch)
            self.batch = batch
            self._all_rows = np.ones(batch, dtype=bool)
            self._bind_buffers()
        for slot in self._slots:
            slot.step_in[...] = slot.init
        for name, value in self.param_values.items():
            if name in self.session.inputs:
                self.session.inputs[name][...] = value
        if self._done_in is not None:
            self._done_in[...] = 0.0
        self._count = np.zeros(batch, dtype=np.int64)
        self._skipped = np.zeros(batch, dtype=np.int64)
        self._outliers = np.zeros(batch, dtype=np.int64)  # consecutive outliers per agent
        self._surprise = np.zeros(batch, dtype=np.float32)
        self._last_norm = np.repeat(self._zero_norm[None], batch, axis=0)
        self._last_good_obs: np.ndarray | None = None
        self._cache_key: bytes | None = None  # obs whose action the step outputs hold
        self._hit = False  # the last act() was served from the step outputs
        self._prev_obs: np.ndarray | None = None  # for step()
        self._t = 0
        self._last_out: dict[str, np.ndarray] = {}  # outputs that came with the last action
        if self._episodes is not None:
            self._episodes.reset(batch)
        if self._noise is not None:
            self._noise.reset()
        ood = self.manifest.ood
        self.monitor = OODMonitor(ood.warn, ood.alarm, batch, self.config.changepoint_patience)
        self._ood_raised = False

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Deterministic normalized action in [-1, 1]: ``(A,)`` for ``(O,)``, ``(B, A)`` for
        ``(B, O)``. Non-finite or out-of-bounds observation rows get the safe fallback (and an
        event)."""
        arr = self._rows(obs, self._obs_dim, "obs")
        key = self._cache_key
        self._hit = key is not None and arr.tobytes() == key  # _rows returns float32
        # a hit: the step that absorbed the transition already computed this action
        norm = self._out_norm.copy() if self._hit else self._act_fresh(arr)
        if self._extras and self._exploring:  # only the episode buffer reads them
            outs = self.session.outputs if self._hit else self.act_session.outputs
            self._last_out = {k: outs[k].copy() for k in self._extras}
        self._last_norm = norm
        return norm[0].copy() if arr.ndim == 1 else norm.copy()

    def observe(
        self,
        obs: np.ndarray,
        action: np.ndarray,
        reward: float | np.ndarray,
        next_obs: np.ndarray,
        done: bool | np.ndarray = False,
    ) -> None:
        """Absorb one transition per agent; ``action`` is the *normalized* action from
        :meth:`act`. ``done`` marks the last transition of an episode: the state persists
        across the episodes of a task (call :meth:`reset` for a new task). Non-finite and
        out-of-bounds transitions are skipped."""
        self._v_obs[...] = self._rows(obs, self._obs_dim, "obs")
        self._v_act[...] = self._rows(action, self._act_dim, "action")
        self._v_rew[...] = self._reward(reward)
        nxt = self._rows(next_obs, self._obs_dim, "next_obs")
        self._v_next[...] = nxt
        self._obs_in[...] = nxt
        if self._done_in is not None:
            self._done_in[:, 0] = done
        self._t += 1
        self._cache_key = None
        if not self.config.adaptive:
            return
        if self._episodes is not None and self._episodes.exploring:
            self._record_step()  # after the task's last adaptation nothing reads the buffer
        if self._noise is not None:  # the step graph's action is for next_obs: none after done
            self._noise.fill(self._noise_in, self._exploring and not np.any(done))
        if self._sanitize:
            self._run_sanitized()
        else:
            self.session.run()
        updated = self._updated
        if self.batch == 1:
            ok = updated[0] and self._in_bounds_1() and self._out_surprise[0] <= self._outlier
            if ok and not self._outliers[0]:
                self._accept_all()
                self._maybe_end_episode(done)
                return
        self._accept_some(self._usable(updated.copy()))
        self._maybe_end_episode(done)

    # -- device conveniences -----------------------------------------------------------------
    def act_scaled(self, obs: np.ndarray) -> np.ndarray:
        """Like :meth:`act` but in the family's physical action bounds."""
        norm = self.act(obs)
        if self._hit:  # the graph's own scaled output for this very observation (clamped)
            return self._out_act[0].copy() if norm.ndim == 1 else self._out_act.copy()
        return self.scale(norm)

    def step(
        self, obs: np.ndarray, reward: float | np.ndarray | None = None, done: bool = False
    ) -> np.ndarray:
        """One control step for a device loop: absorb (previous obs, previous action, ``reward``,
        ``obs``) when there is a previous step, then return the *physical* action for ``obs``.
        Pass ``done=True`` with the final observation of an episode."""
        obs = self._rows(obs, self._obs_dim, "obs")  # errors name the caller's argument
        if self._prev_obs is not None and reward is not None:
            self.observe(self._prev_obs, self._last_norm, reward, obs, done)
        action = self.act_scaled(obs)
        self._prev_obs = None if done else np.array(obs, dtype=np.float32)
        return action

    def scale(self, action_norm: np.ndarray) -> np.ndarray:
        """Normalized [-1, 1] -> physical bounds, clipped (float32)."""
        phys = self._act_low + self._half * (np.asarray(action_norm, dtype=np.float32) + 1.0)
        return np.clip(phys, self._act_low, self._act_high)

    # -- state -------------------------------------------------------------------------------
    @property
    def state(self) -> dict[str, np.ndarray]:
        """A copy of every agent's adaptation state, by declared name (batch axis first)."""
        return {slot.name: slot.step_in.copy() for slot in self._slots}

    @property
    def summary(self) -> AdaptationSummary:
        """What each agent has adapted to: the family's summary vector, spread, entropy and
        the transition counts."""
        # The live buffers, not copies: summarize() only reads them (the field runner calls this
        # every control step, and a MAML state is thousands of weights).
        s = self.adaptation.summarize({slot.name: slot.step_in for slot in self._slots})
        s = Summary(np.array(s.mean), np.array(s.spread), s.entropy)  # never a live buffer
        if self.batch == 1:
            return AdaptationSummary(
                self.algorithm, s.mean[0], s.spread[0], float(s.entropy[0]),
                int(self._count[0]), int(self._skipped[0]),
            )  # fmt: skip
        return AdaptationSummary(
            self.algorithm, s.mean, s.spread, s.entropy, self._count.copy(), self._skipped.copy()
        )

    @property
    def belief(self) -> AdaptationSummary:
        """Alias of :attr:`summary` (PEARL: posterior mean, marginal variance, entropy)."""
        return self.summary

    @property
    def ood_score(self) -> float:
        """Surprise of the last absorbed transition (the largest over the batch)."""
        return float(self._surprise.max())

    @property
    def ood_scores(self) -> np.ndarray:
        """Surprise of each agent's last absorbed transition, ``(B,)``."""
        return self._surprise.copy()

    @property
    def providers(self) -> list[str]:
        """Execution providers the step graph runs on."""
        return self.session.providers

    def drain_events(self) -> list[Event]:
        """Events since the last drain, oldest first."""
        out = list(self.events)
        self.events.clear()
        return out

    def reset_state(self, rows: np.ndarray | None = None) -> None:
        """Adaptation state of ``rows`` (all by default) back to its initial value, keeping
        the batch, events and counters of skipped input (the ``reset-state`` command)."""
        rows = np.ones(self.batch, dtype=bool) if rows is None else rows
        for slot in self._slots:
            slot.step_in[rows] = slot.init
        self._count[rows] = 0
        self._outliers[rows] = 0
        self.monitor.reset(rows)
        self._ood_raised = self.monitor.raised()
        self._cache_key = None  # cached actions were for the old state

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Set every agent's adaptation state to ``state`` (declared name -> array shaped like
        :attr:`state`, e.g. a copy taken earlier); counters and events are kept. A missing or
        unknown name, a wrong shape or a non-finite value raises :class:`InputError`."""
        names = {slot.name for slot in self._slots}
        if set(state) != names:
            raise InputError(
                f"state: expected the names {sorted(names)}, got {sorted(map(str, state))}"
            )
        for slot in self._slots:
            value = np.asarray(state[slot.name])
            if value.shape != slot.step_in.shape or not np.isfinite(value).all():
                raise InputError(
                    f"state[{slot.name!r}]: expected finite values of shape "
                    f"{slot.step_in.shape}, got shape {value.shape}"
                )
        for slot in self._slots:
            slot.step_in[...] = state[slot.name]
        self._cache_key = None  # cached actions were for the old state

    def self_test(self, steps: int = 200) -> SelfTestReport:
        """Run the bundle's test vectors through this agent's graph and time ``steps`` steps
        (on a separate single agent, so this agent's state is untouched)."""
        from runtime.selftest import run_self_test

        return run_self_test(self, steps)

    # -- internals ---------------------------------------------------------------------------
    def _param_values(self) -> dict[str, float]:
        given = dict(self.config.params)
        if self.config.forget is not None:
            given["forget"] = self.config.forget
        try:
            return self.adaptation.param_values(given)
        except ValueError as err:
            raise InputError(str(err)) from None

    def _session(self, graph: str, providers: list[str] | None) -> GraphSession:
        spec = self.manifest.graph(graph)
        return GraphSession(
            self.bundle_dir / spec.file,
            spec,
            batch=1,
            providers=providers or self.manifest.providers,
            tuning=self.config.tuning,
            iobinding=self.config.iobinding,
        )

    def _bind_buffers(self) -> None:
        """Pair the declared state with the graphs' buffers, by name."""
        ins, outs = self.session.inputs, self.session.outputs
        self._tr, self._obs_in = ins["transition"], ins["obs"]
        self._done_in = ins.get("done")
        o, a = self._obs_dim, self._act_dim
        # Views into the transition buffer: (obs, action, reward, next_obs) columns.
        self._v_obs, self._v_act = self._tr[:, :o], self._tr[:, o : o + a]
        self._v_rew, self._v_next = self._tr[:, o + a], self._tr[:, o + a + 1 :]
        self._tr_row = self._tr[0]  # single-agent bounds check (_in_bounds_1)
        self._inside = np.zeros((2, self._tr.shape[1]), dtype=bool)
        self._inside_lo, self._inside_hi = self._inside[0], self._inside[1]
        self._all_inside = np.ones_like(self._inside).tobytes()
        act_ins = self.act_session.inputs
        self._slots = [
            _StateSlot(
                s.name,
                ins[s.name],
                outs[s.name + STATE_OUT_SUFFIX],
                act_ins.get(s.name),
                s.initial(self.bundle_dir),
            )
            for s in self.adaptation.state
        ]
        self._out_norm, self._updated = outs["action_norm"], outs["updated"]
        self._out_act, self._out_surprise = outs["action"], outs["surprise"]
        self._p_obs = act_ins["obs"]
        self._p_norm = self.act_session.outputs["action_norm"]
        noise = self.adaptation.noise
        self._noise_in = ins.get(noise.input) if noise else None
        self._p_noise = act_ins.get(noise.input) if noise else None
        ep = self.adaptation.episodic
        self._extras = [
            f.source.split(":", 1)[1] for f in (ep.fields if ep else []) if ":" in f.source
        ]

    def _run_sanitized(self) -> None:
        finite = np.isfinite(self._tr).all(axis=1)
        if finite.all():
            self.session.run()
            return
        self._tr[~finite] = 0.0
        self._obs_in[~finite] = 0.0
        self.session.run()
        self._updated &= finite
        self._tr[~finite] = np.nan  # so the event says "nonfinite_input"

    def _in_bounds_1(self) -> bool:
        """Single agent fast path of :meth:`_rows_inside`: both comparisons into a preallocated
        buffer, then one byte comparison (0.6 µs; ``ndarray.all()`` alone costs ~1 µs)."""
        np.greater_equal(self._tr_row, self._row_lo, out=self._inside_lo)
        np.less_equal(self._tr_row, self._row_hi, out=self._inside_hi)
        return self._inside.tobytes() == self._all_inside

    def _rows_inside(self) -> np.ndarray:
        """Per transition row: finite, and both observations within the limits (NaN compares
        False; the action and reward parts only have to be finite)."""
        return ((self._tr >= self._row_lo) & (self._tr <= self._row_hi)).all(axis=1)

    def _in_bounds(self, obs_BO: np.ndarray) -> np.ndarray:
        return ((obs_BO >= self._obs_lo) & (obs_BO <= self._obs_hi)).all(axis=1)

    def _usable(self, updated: np.ndarray) -> np.ndarray:
        """Rows to absorb: finite, in bounds, and not a lone outlier (see ``outlier_factor``)."""
        inside = self._rows_inside()
        self._oob = updated & ~inside
        outlier = updated & inside & (self._out_surprise > self._outlier)
        self._outliers = np.where(outlier, self._outliers + 1, 0)
        self._lone = outlier & (self._outliers < self.config.outlier_patience)
        return updated & inside & ~self._lone

    def _accept_all(self) -> None:
        """Every row's update is finite: it becomes the state; the outputs' actions are valid
        for the observation just absorbed. Written with indexing rather than ufunc calls: at
        batch 1 a numpy ufunc call costs ~1-2 µs, an indexed copy ~0.2 µs."""
        for slot in self._slots:
            slot.step_in[...] = slot.step_out
        self._surprise[...] = self._out_surprise
        self._cache_key = self._obs_in.tobytes()
        if self.batch == 1:
            self._count[0] += 1
            alert = self._ood_raised or self._out_surprise[0] > self._warn
        else:
            self._count += 1
            alert = self._ood_raised or bool((self._out_surprise > self._warn).any())
        if self.config.fallback == "policy":
            self._last_good_obs = self._obs_in.copy()
        if alert:
            self._check_ood(self._all_rows)

    def _accept_some(self, rows: np.ndarray) -> None:
        """Rows whose transition or update is refused keep their old state (and count)."""
        if rows.all():
            self._accept_all()
            return
        for slot in self._slots:
            slot.step_in[rows] = slot.step_out[rows]
        self._surprise[rows] = self._out_surprise[rows]
        self._count += rows
        self._skipped += ~rows
        finite_input = np.isfinite(self._tr).all(axis=1)
        # Debug, not warning: every skip is an event already, and a device fed garbage at
        # 100 Hz must not flood its log.
        log.debug("step %d: %d transition(s) skipped", self._t, (~rows).sum())
        for i in np.flatnonzero(~rows):
            self._emit(self._skip_event(int(i), bool(finite_input[i])))
        self._check_ood(rows)

    def _skip_event(self, i: int, finite_input: bool) -> Event:
        if not finite_input:
            return Event("nonfinite_input", i, self._t, detail="transition skipped")
        if self._oob[i]:
            return Event("out_of_bounds_input", i, self._t, detail="observation beyond bounds")
        if self._lone[i]:
            value = float(self._out_surprise[i])
            return Event("outlier_rejected", i, self._t, value, "surprise beyond outlier level")
        return Event("nonfinite_belief", i, self._t, detail="transition skipped")

    def _check_ood(self, updated: np.ndarray) -> None:
        events, fired = self.monitor.update(self._out_surprise, updated, self._t)
        for ev in events:
            self._emit(ev)
        self._ood_raised = self.monitor.raised()
        if self.config.changepoint == "reset" and fired.any():
            self.reset_state(fired)
            for i in np.flatnonzero(fired):
                self._emit(Event("changepoint_reset", int(i), self._t, float(self._surprise[i])))

    def _act_fresh(self, arr: np.ndarray) -> np.ndarray:
        """Actions for ``arr`` from the act graph under the current state.

        Non-finite or out-of-bounds rows are replaced by the last good observation (zeros
        before any), so with the "policy" fallback their output already is the policy at the
        last good observation.
        """
        obs = arr.reshape(self.batch, self._obs_dim)
        good = self._in_bounds(obs)  # NaN compares False: non-finite rows are not good
        if good.all():
            self._p_obs[:] = obs
        else:
            self._p_obs[:] = np.where(good[:, None], obs, self._prev_good())
        for slot in self._slots:
            if slot.act_in is not None:
                slot.act_in[...] = slot.step_in
        if self._noise is not None:
            self._noise.fill(self._p_noise, self._exploring)
        self.act_session.run()
        norm = self._p_norm.copy()
        usable = good  # rows whose output is the policy at a real observation
        if self.config.fallback == "policy":
            usable = good | (self._last_good_obs is not None)
            self._last_good_obs = self._p_obs.copy()
        bad = ~good | ~np.isfinite(norm).all(axis=1)
        if bad.any():
            norm[bad] = self._fallback(bad, norm, usable)
        return np.clip(norm, -1.0, 1.0)

    def _fallback(self, bad: np.ndarray, norm: np.ndarray, usable: np.ndarray) -> np.ndarray:
        """Safe actions for the ``bad`` rows (normalized), with one event per row."""
        mode = self.config.fallback
        if mode == "hold":
            out = self._last_norm[bad]
        elif mode == "policy":
            out = np.where(usable[bad, None], norm[bad], self._zero_norm)
        else:
            out = np.repeat(self._zero_norm[None], int(bad.sum()), axis=0)
        out = np.where(np.isfinite(out), out, self._zero_norm)
        for i in np.flatnonzero(bad):
            self._emit(Event("fallback_action", int(i), self._t, detail=f"mode {mode}"))
        return out

    def _prev_good(self) -> np.ndarray:
        if self._last_good_obs is None:
            return np.zeros((self.batch, self._obs_dim), dtype=np.float32)
        return self._last_good_obs

    def _emit(self, event: Event) -> None:
        self.events.append(event)
        log.debug("agent %d step %d: %s %s", event.agent, event.step, event.kind, event.detail)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # a telemetry callback must never stop the control loop
                log.exception("on_event callback failed")

    def _rows(self, x: np.ndarray, width: int, what: str) -> np.ndarray:
        """Validate shape/dtype of an obs or action: ``(width,)`` for one agent, else (B, width).
        ``what`` is the caller's argument name, used in the error."""
        if type(x) is np.ndarray and x.dtype is _F32:  # the per-step case: ~0.1 µs, not 0.4
            shape = x.shape
            if shape == (self.batch, width) or (self.batch == 1 and shape == (width,)):
                return x
        arr = x if type(x) is np.ndarray else np.asarray(x)
        shape = arr.shape
        if arr.dtype.kind == "f" and (
            shape == (self.batch, width) or (self.batch == 1 and shape == (width,))
        ):
            if arr.dtype != np.float32:  # float64 beyond float32 range becomes inf: refused
                with np.errstate(over="ignore"):
                    arr = arr.astype(np.float32)
            return arr
        want = f"({width},) or (1, {width})" if self.batch == 1 else f"({self.batch}, {width})"
        raise InputError(
            f"{what}: expected a float32 array of shape {want}, "
            f"got {arr.dtype} array of shape {arr.shape}"
        )

    def _reward(self, reward: float | np.ndarray) -> np.ndarray | float:
        if type(reward) is float and self.batch == 1 and -3e38 < reward < 3e38:
            return reward  # fast path; NaN and huge values take the checked path below
        arr = np.asarray(reward)
        if arr.dtype.kind not in "fiu" or arr.size != self.batch or arr.ndim > 2:
            raise InputError(
                f"reward: expected {self.batch} float value(s), "
                f"got {arr.dtype} array of shape {arr.shape}"
            )
        if arr.dtype == np.float32:
            return arr.reshape(self.batch)
        with np.errstate(over="ignore"):  # beyond float32 range becomes inf: refused
            return arr.reshape(self.batch).astype(np.float32)

    @property
    def _exploring(self) -> bool:
        """Stochastic families sample while episodic adaptations remain in the task."""
        return self._episodes.exploring if self._episodes is not None else False

    def _record_step(self) -> None:
        """Put the transition (and what came with its action) in the episode buffer."""
        a = self._act_dim
        values = {
            "obs": self._v_obs, "action": self._v_act, "reward": self._v_rew,
            "next_obs": self._v_next,
            **{f"output:{k}": self._last_out.get(k, np.zeros((self.batch, a), np.float32))
               for k in self._extras},
        }  # fmt: skip
        self._episodes.record(values, self._rows_inside().astype(np.float32))

    def _maybe_end_episode(self, done: bool | np.ndarray) -> None:
        eps = self._episodes
        if eps is None or not eps.episode_over(bool(np.any(done))):
            return
        state = {slot.name: slot.step_in for slot in self._slots}
        if eps.end_episode(state, self.param_values, self._emit, self._t):
            self._cache_key = None  # the cached action was for the old weights

    def _warm_up(self) -> None:
        for _ in range(self.config.warmup):
            self.session.run()
            self.act_session.run()
        self.reset()


def evaluate_bundle(
    bundle_dir: str | Path,
    split: str = "test",
    tasks: int | None = None,
    episodes: int | None = None,
    seed: int = 0,
    oracle_return: float | None = None,
    pubkey: str | Path | bytes | None = None,
    config: AgentConfig | None = None,
) -> EvalReport:
    """Meta-test a bundle with the shared protocol; same JSON as evaluating the run (torch-free).

    ``tasks``/``episodes`` default to the run's eval settings recorded in the manifest.
    """
    manifest = load_verified(bundle_dir, pubkey)
    eval_cfg = manifest.provenance.get("eval", {})
    n = int(tasks or (eval_cfg.get("tasks", 20) if isinstance(eval_cfg, dict) else 20))
    episodes = int(episodes or (eval_cfg.get("episodes", 3) if isinstance(eval_cfg, dict) else 3))
    from dataclasses import replace

    from runtime.evaluation import held_out_tasks, meta_test
    from runtime.plugins import import_plugins
    from runtime.tasks import make_family

    config = config or AgentConfig()
    import_plugins(manifest.plugins, source=f"bundle {bundle_dir}")

    env = manifest.env
    family = make_family(env, 1)
    task_set = held_out_tasks(family, split, n, seed)
    adaptive = Agent(manifest, bundle_dir, config=config)
    fixed = Agent(manifest, bundle_dir, config=replace(config, adaptive=False))
    return meta_test(
        adaptive, fixed, env, task_set, episodes, seed, str(split), oracle_return,
        source=str(bundle_dir),
    )  # fmt: skip


def _obs_limits(manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """Accepted observation range: the declared bounds widened by ``obs_margin`` x their
    width on each side (infinite bounds stay infinite)."""
    low = np.asarray(manifest.obs.low, dtype=np.float64)
    high = np.asarray(manifest.obs.high, dtype=np.float64)
    width = np.where(np.isfinite(high - low), high - low, 0.0)
    pad = manifest.obs_margin * width
    return (low - pad).astype(np.float32), (high + pad).astype(np.float32)


def _zero_action(low: np.ndarray, half: np.ndarray) -> np.ndarray:
    """The normalized action whose physical value is closest to 0."""
    safe_half = np.where(half > 0, half, 1.0)
    return np.clip((0.0 - low) / safe_half - 1.0, -1.0, 1.0).astype(np.float32)
