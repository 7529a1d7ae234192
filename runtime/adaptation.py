"""The adaptation contract: what a meta-RL family declares so the runtime can run it blindly.

Every family (PEARL's Gaussian belief, RL²'s recurrent memory, ...) adapts by carrying named
**state tensors** from one transition to the next. A bundle declares them in the manifest's
``adaptation`` section (a discriminated union on ``algorithm``), and its graphs follow two
signatures that the runtime pairs by name:

- ``step``: ``(transition, obs, [done], *state, [*params]) -> (action, action_norm,
  *<state>_out, surprise, updated, [extras])``. It absorbs the latest transition into the state
  and returns the action for ``obs`` under the new state. ``updated`` is False for a row whose
  transition or new state is not finite (the runtime keeps the old state); ``surprise`` is the
  family's out-of-distribution score of the transition (about 1 in distribution).
- ``act``: ``(obs, *state) -> (action, action_norm)``: the action under the current state,
  absorbing nothing (the first step of a task or an episode, fallbacks). It may take only the
  state tensors it needs (a full belief's act graph reads the mean, not the covariance).

``transition`` is ``concat(obs, action_norm, reward, next_obs)`` (:mod:`runtime.transition`);
``done`` (1.0 at the last transition of an episode) is fed when the step graph declares it;
``params`` are per-agent knobs with a default and bounds (PEARL's forgetting factor).
Nothing in the runtime's safety shell (:mod:`runtime.agent`) looks at ``algorithm``: a new
family declares its state in a :class:`GenericAdaptation` and the runtime runs it; a class of
its own here is only needed for family-specific manifest fields or telemetry summary.

This module runs on the device: numpy and pydantic only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

#: Step-graph inputs that are not state or params (the runtime fills them).
STEP_DATA_INPUTS = ("transition", "obs", "done")
#: Outputs every step graph has besides the ``<state>_out`` tensors.
STEP_OUTPUTS = ("action", "action_norm", "surprise", "updated")
ACT_OUTPUTS = ("action", "action_norm")
STATE_OUT_SUFFIX = "_out"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StateSpec(_Strict):
    """One state tensor of an agent (the batch axis is implied, not listed in ``shape``)."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    shape: list[int] = Field(description="per-agent shape, e.g. [5] or [5, 5]")
    init: float | list[float] | str = Field(
        description="initial value: one fill value, every entry of one agent's state "
        "(row-major), or the name of a float32 .npy file in the bundle (large states: MAML's "
        "meta-learned weights)"
    )

    @model_validator(mode="after")
    def _init_fits(self) -> StateSpec:
        if any(s < 1 for s in self.shape):
            raise ValueError(f"state {self.name!r}: shape {self.shape} must be positive")
        if isinstance(self.init, list) and len(self.init) != int(np.prod(self.shape)):
            raise ValueError(
                f"state {self.name!r}: init has {len(self.init)} values, shape {self.shape} "
                f"needs {int(np.prod(self.shape))}"
            )
        if isinstance(self.init, str) and not re.fullmatch(r"[\w.-]+\.npy", self.init):
            raise ValueError(f"state {self.name!r}: init file {self.init!r} is not a .npy name")
        return self

    def initial(self, bundle_dir: Path | None = None) -> np.ndarray:
        """One agent's initial state, float32, of shape ``shape`` (an init file is read from
        ``bundle_dir``; the manifest's hashes cover it)."""
        if isinstance(self.init, str):
            return _load_init(Path(bundle_dir or "."), self.init, self.name, self.shape)
        if isinstance(self.init, list):
            return np.asarray(self.init, dtype=np.float32).reshape(self.shape)
        return np.full(self.shape, self.init, dtype=np.float32)


class ParamSpec(_Strict):
    """A per-agent scalar knob fed to the step graph as a ``[batch, 1]`` input."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    default: float
    low: float
    high: float
    description: str = ""

    @model_validator(mode="after")
    def _default_in_range(self) -> ParamSpec:
        if not self.low <= self.default <= self.high:
            raise ValueError(
                f"param {self.name!r}: default {self.default} outside [{self.low}, {self.high}]"
            )
        return self


@dataclass(frozen=True)
class Summary:
    """What telemetry and plots show of an agent's adaptation state (batch axis first).

    ``mean``: a small vector that tracks the task (PEARL: the belief mean; others: a declared
    projection of the state); ``spread``: its uncertainty where the family has one (PEARL's
    marginal variance; else an empty vector); ``entropy``: nats, NaN where not defined.
    """

    mean: np.ndarray  # (B, S)
    spread: np.ndarray  # (B, S) or (B, 0)
    entropy: np.ndarray  # (B,)


class BufferField(_Strict):
    """One per-step quantity the runtime keeps in the episode buffer: a part of the transition
    (``obs``, ``action``, ``reward``, ``next_obs``) or an output of the graph call that chose
    the action (``output:<name>``, e.g. MAML's raw Gaussian sample)."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="the adapt graph's input")
    source: str = Field(pattern=r"^(obs|action|reward|next_obs|output:[a-z][a-z0-9_]*)$")


class EpisodicSpec(_Strict):
    """Adaptation between episodes (MAML's inner gradient step). The runtime buffers each
    step of the current episodes in fixed slots (``episode * horizon + t``), and after every
    ``every_episodes`` episodes, up to ``max_adaptations`` times per task, runs ``graph`` on
    (state, buffer fields, ``mask``, params) -> ``<state>_out``, ``ok`` and statistics (events).
    Rows whose ``ok`` is False keep their state."""

    graph: str = "adapt"
    horizon: int = Field(ge=1, description="slots per episode")
    every_episodes: int = Field(ge=1)
    max_adaptations: int = Field(ge=0)
    fields: list[BufferField] = Field(min_length=1)
    mask: str = "mask"
    ok: str = "ok"

    @property
    def capacity(self) -> int:
        return self.horizon * self.every_episodes


class NoiseSpec(_Strict):
    """A standard-normal input the runtime draws for every chosen action (exploration of a
    stochastic policy), from its own seeded generator; zeros once the task's episodic
    adaptations are done (the adapted policy flies its mean)."""

    input: str = "noise"
    dim: int = Field(ge=1)


class _Adaptation(_Strict):
    """Fields every family declares."""

    state: list[StateSpec] = Field(min_length=1)
    params: list[ParamSpec] = Field(default_factory=list)
    episodic: EpisodicSpec | None = None
    noise: NoiseSpec | None = None
    #: Names of the ``summary`` vector's entries (for plots and the dashboard).
    summary_names: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> _Adaptation:
        names = [s.name for s in self.state] + [p.name for p in self.params]
        clash = set(names) & set(STEP_DATA_INPUTS)
        if len(set(names)) != len(names) or clash:
            raise ValueError(
                f"state and param names must be unique and not {STEP_DATA_INPUTS}: {names}"
            )
        return self

    def state_spec(self, name: str) -> StateSpec:
        return next(s for s in self.state if s.name == name)

    def param_values(self, given: dict[str, float]) -> dict[str, float]:
        """Every declared param's value: its default, or what ``given`` sets; a name the
        family does not declare or a value outside the param's range is a ValueError."""
        declared = {p.name: p for p in self.params}
        values = {name: p.default for name, p in declared.items()}
        for name, value in given.items():
            spec = declared.get(name)
            if spec is None:
                raise ValueError(
                    f"{getattr(self, 'algorithm', '')} bundles have no param {name!r}; they "
                    f"declare: {', '.join(declared) or 'none'}"
                )
            if not spec.low <= float(value) <= spec.high:
                raise ValueError(f"{name} must be in [{spec.low}, {spec.high}], got {value}")
            values[name] = float(value)
        return values

    def summarize(self, state: dict[str, np.ndarray]) -> Summary:
        """Default: the first (up to 8) entries of the first state tensor, no spread."""
        first = state[self.state[0].name]
        flat = first.reshape(len(first), -1)[:, :8].astype(np.float32)
        b = len(flat)
        return Summary(flat, np.zeros((b, 0), np.float32), np.full(b, np.nan, np.float32))


class PearlAdaptation(_Adaptation):
    """PEARL: a Gaussian belief over a task latent, from per-transition Gaussian factors.

    Diagonal factors (``factor_rank`` 0): state (precision, eta), the natural parameters.
    Factors with rank-one directions: state (cov, mean), a full Gaussian (Kalman updates).
    """

    algorithm: Literal["pearl"] = "pearl"
    latent_dim: int = Field(ge=1)
    factor_rank: int = Field(0, ge=0, description="rank-one directions per factor; > 0: full")
    factor_diagonal: bool = Field(True, description="whether factors have a diagonal part")
    factor_var: Literal["per_transition", "shared"] = Field(
        "per_transition",
        description="the diagonal part's variance: per transition, or one shared by all",
    )
    prior_var: float = Field(gt=0)
    min_var: float = Field(gt=0)

    @model_validator(mode="after")
    def _state_matches_belief(self) -> PearlAdaptation:
        want = ["cov", "mean"] if self.factor_rank > 0 else ["precision", "eta"]
        have = [s.name for s in self.state]
        if have != want:
            raise ValueError(f"factor_rank {self.factor_rank} needs state {want}, got {have}")
        return self

    @property
    def full_belief(self) -> bool:
        return self.factor_rank > 0

    def summarize(self, state: dict[str, np.ndarray]) -> Summary:
        from runtime.posterior import Belief, FullBelief, entropy

        if self.full_belief:
            b = FullBelief(state["cov"], state["mean"], np.zeros(len(state["mean"]), np.int64))
        else:
            b = Belief(state["precision"], state["eta"], np.zeros(len(state["eta"]), np.int64))
        return Summary(b.mean, b.var, entropy(b).astype(np.float32))


class RL2Adaptation(_Adaptation):
    """RL²: a recurrent hidden state that absorbs every transition (kept across the episodes
    of a task, reset for a new task). Its summary is a fixed linear projection of the hidden
    state fitted at export (principal components over in-distribution rollouts)."""

    algorithm: Literal["rl2"] = "rl2"
    hidden_size: int = Field(ge=1)
    summary_center: list[float] = Field(default_factory=list)
    summary_basis: list[list[float]] = Field(
        default_factory=list, description="rows: directions in hidden space"
    )

    @cached_property
    def _projection(self) -> tuple[np.ndarray, np.ndarray]:
        """(center, basis) as arrays, built once (summarize runs every control step)."""
        return np.asarray(self.summary_center, np.float32), np.asarray(
            self.summary_basis, np.float32
        )

    def summarize(self, state: dict[str, np.ndarray]) -> Summary:
        if not self.summary_basis:
            return super().summarize(state)
        center, basis = self._projection
        proj = (state[self.state[0].name] - center) @ basis.T
        b = len(proj)
        return Summary(proj, np.zeros((b, 0), np.float32), np.full(b, np.nan, np.float32))


class GenericAdaptation(_Adaptation):
    """Any other family: the contract's common fields, plus ``info`` for the family's own
    constants. A new family needs no runtime code: its summary is the first entries of its
    first state tensor unless it adds a class of its own here."""

    algorithm: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    info: dict[str, float | int | str | bool | list[float]] = Field(default_factory=dict)


_KNOWN = {"pearl", "rl2"}  # MAML runs as a GenericAdaptation with episodic + noise


def _family_tag(value: object) -> str:
    algo = value.get("algorithm") if isinstance(value, dict) else getattr(value, "algorithm", "")
    return algo if algo in _KNOWN else "generic"


Adaptation = Annotated[
    Annotated[PearlAdaptation, Tag("pearl")]
    | Annotated[RL2Adaptation, Tag("rl2")]
    | Annotated[GenericAdaptation, Tag("generic")],
    Discriminator(_family_tag),
]


def check_graph_signatures(
    adaptation: _Adaptation, graphs: dict[str, tuple[list[str], list[str]]]
) -> list[str]:
    """Problems with the step/act graphs' I/O names against the declaration (empty: fine).

    ``graphs`` maps graph name -> (input names, output names); every graph whose name starts
    with ``step`` follows the step signature, ``act`` the act signature.
    """
    states = [s.name for s in adaptation.state]
    params = [p.name for p in adaptation.params]
    noise = {adaptation.noise.input} if adaptation.noise else set()
    problems = []
    for name, (ins, outs) in graphs.items():
        if name.startswith("step"):  # params may feed the step graph, the adapt graph or both
            need_in = {"transition", "obs", *states}
            allowed_in = need_in | {"done", *params} | noise
            need_out = {*STEP_OUTPUTS, *(s + STATE_OUT_SUFFIX for s in states)}
        elif name == "act":  # the state it needs (the exporter drops unused inputs)
            need_in, allowed_in = {"obs"}, {"obs", *states} | noise
            need_out = set(ACT_OUTPUTS)
        elif adaptation.episodic is not None and name == adaptation.episodic.graph:
            ep = adaptation.episodic
            allowed_in = {*states, *params, ep.mask, *(f.name for f in ep.fields)}
            need_in = {ep.mask, *(f.name for f in ep.fields)}
            need_out = {ep.ok} | ({s + STATE_OUT_SUFFIX for s in states} & set(outs))
            if not need_out - {ep.ok}:
                problems.append(f"graph {name!r} updates no declared state")
        else:
            continue
        if not need_in <= set(ins) or not set(ins) <= allowed_in:
            problems.append(f"graph {name!r} has inputs {ins}; the declaration needs {need_in}")
        if not need_out <= set(outs):
            problems.append(f"graph {name!r} has outputs {outs}; it needs {sorted(need_out)}")
    required = ["step", "act"] + ([adaptation.episodic.graph] if adaptation.episodic else [])
    problems += [f"no {name!r} graph" for name in required if name not in graphs]
    return problems


def _load_init(bundle_dir: Path, file: str, name: str, shape: list[int]) -> np.ndarray:
    """A state's initial value from a .npy file of the bundle (no pickles)."""
    from runtime.errors import BundleError

    try:
        arr = np.load(bundle_dir / file, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise BundleError(f"{bundle_dir / file}: unreadable initial state ({exc})") from None
    if arr.size != int(np.prod(shape)):
        raise BundleError(f"{file}: {arr.size} values for state {name!r} of shape {shape}")
    return arr.astype(np.float32).reshape(shape)
