"""Adaptation between episodes, and exploration noise: the generic half of the contract that
gradient-based families (MAML) declare (:class:`runtime.adaptation.EpisodicSpec`,
:class:`runtime.adaptation.NoiseSpec`).

:class:`EpisodeBuffer` keeps each step of the current episodes in fixed slots
(``episode * horizon + t``) and, after every ``every_episodes`` episodes and at most
``max_adaptations`` times per task, runs the family's adapt graph on (state, buffer, mask,
params) one agent at a time (the adapt graph has a static batch of one). It never looks at the
algorithm: inputs and outputs are paired with the declaration by name. Numpy + onnxruntime.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from runtime.adaptation import STATE_OUT_SUFFIX, EpisodicSpec, NoiseSpec
from runtime.bundle import Manifest
from runtime.errors import BundleError
from runtime.ood import Event
from runtime.session import GraphSession

log = logging.getLogger(__name__)


class ExplorationNoise:
    """Standard-normal draws for a stochastic policy's ``noise`` input, from a seeded
    generator restarted at every new task (same seed, same flights)."""

    def __init__(self, spec: NoiseSpec, seed: int) -> None:
        self.spec = spec
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def fill(self, buffer: np.ndarray | None, explore: bool) -> None:
        """Write one draw per agent into ``buffer`` (zeros when not exploring)."""
        if buffer is None:
            return
        if explore:
            buffer[...] = self.rng.standard_normal(buffer.shape).astype(np.float32)
        else:
            buffer[...] = 0.0


class EpisodeBuffer:
    """The episodes flown since the last adaptation, and the adapt graph that consumes them."""

    def __init__(
        self,
        spec: EpisodicSpec,
        manifest: Manifest,
        bundle_dir: Path,
        providers: list[str],
        obs_dim: int,
        act_dim: int,
        limits: dict[str, float] | None = None,
    ) -> None:
        self.spec = spec
        self.limits = dict(limits or {})
        graph = manifest.graph(spec.graph)
        self.session = GraphSession(bundle_dir / graph.file, graph, batch=1, providers=providers)
        self.widths = {
            f.name: _width(f.source, obs_dim, act_dim, graph.input(f.name).shape)
            for f in spec.fields
        }
        self.outputs = [t.name for t in graph.outputs]
        self.inputs = {t.name for t in graph.inputs}
        unknown = set(self.limits) - set(self.outputs)
        if unknown:
            raise BundleError(
                f"adapt_limits {sorted(unknown)}: the {spec.graph} graph outputs {self.outputs}"
            )
        self.batch = 0
        #: Set by ``bench adapt`` only: keep a copy of the first agent's feeds of each
        #: adaptation in :attr:`last_feeds` (a device never pays for the copy).
        self.keep_last_feeds = False
        self.last_feeds: dict[str, np.ndarray] | None = None

    @property
    def exploring(self) -> bool:
        """True while adaptations remain in this task (the policy must sample)."""
        return self.phase < self.spec.max_adaptations

    def reset(self, batch: int) -> None:
        """A new task: empty buffer, first episode, no adaptation yet."""
        n = self.spec.capacity
        self.batch = batch
        self.data = {
            name: np.zeros((batch, n) + ((w,) if w else ()), np.float32)
            for name, w in self.widths.items()
        }
        self.mask = np.zeros((batch, n), np.float32)
        self.phase = self.episode = self.t = 0

    def record(self, values: dict[str, np.ndarray], usable: np.ndarray) -> None:
        """Store one step per agent; ``usable`` False rows are masked out (non-finite input)."""
        slot = self.episode * self.spec.horizon + self.t
        if slot < self.spec.capacity:
            for f in self.spec.fields:
                target = self.data[f.name][:, slot]
                target[...] = np.asarray(values[f.source]).reshape(target.shape)
            self.mask[:, slot] = usable
        self.t += 1

    def episode_over(self, done: bool) -> bool:
        """Whether the step just recorded ended an episode (``done`` or the horizon)."""
        return (done or self.t >= self.spec.horizon) and self.t > 0

    def end_episode(
        self,
        state: dict[str, np.ndarray],
        params: dict[str, float],
        emit: Callable[[Event], None],
        step: int,
    ) -> bool:
        """Close the episode; after ``every_episodes`` of them adapt (while adaptations remain).
        Updates ``state`` in place; returns whether an adaptation ran."""
        self.t = 0
        self.episode += 1
        if self.episode < self.spec.every_episodes:
            return False
        ran = self.exploring
        if ran:
            self._adapt(state, params, emit, step)
        self.phase += 1
        self.episode = 0
        self.mask[:] = 0.0
        return ran

    def _adapt(
        self,
        state: dict[str, np.ndarray],
        params: dict[str, float],
        emit: Callable[[Event], None],
        step: int,
    ) -> None:
        spec = self.spec
        for b in range(self.batch):
            feeds: dict[str, np.ndarray] = {spec.mask: self.mask[b : b + 1]}
            feeds |= {name: arr[b : b + 1] for name, arr in self.data.items()}
            feeds |= {k: v[b : b + 1] for k, v in state.items() if k in self.inputs}
            feeds |= {
                k: np.full((1, 1), v, np.float32) for k, v in params.items() if k in self.inputs
            }
            if b == 0 and self.keep_last_feeds:
                self.last_feeds = {k: v.copy() for k, v in feeds.items()}
            t0 = time.perf_counter_ns()
            out = self.session.run_feeds(feeds)
            elapsed_us = (time.perf_counter_ns() - t0) / 1e3
            ok = bool(np.asarray(out[spec.ok]).reshape(-1)[0])
            updates = {k: out[k + STATE_OUT_SUFFIX] for k in state if k + STATE_OUT_SUFFIX in out}
            ok = ok and all(np.isfinite(v).all() for v in updates.values())
            stats = {
                k: float(np.asarray(v).reshape(-1)[0])
                for k, v in out.items()
                if k != spec.ok and not k.endswith(STATE_OUT_SUFFIX)
            }
            stats["time_us"] = elapsed_us
            detail = " ".join(f"{k}={v:.4g}" for k, v in stats.items())
            over = [k for k, limit in self.limits.items() if not stats.get(k, 0.0) <= limit]
            if over:
                ok = False
                detail += f" (over the limit: {', '.join(over)})"
            if ok:
                for k, v in updates.items():
                    state[k][b] = v[0]
                emit(Event("adapted", b, step, stats.get("loss_after", float("nan")), detail))
            else:
                log.warning("agent %d: adaptation refused (%s), state kept", b, detail)
                emit(Event("adapt_rejected", b, step, detail=detail))


def _width(source: str, obs_dim: int, act_dim: int, shape: list[int | str]) -> int:
    """Per-slot width of a buffer field (0 for a scalar), from its source or the graph."""
    if source in ("obs", "next_obs"):
        return obs_dim
    if source == "action":
        return act_dim
    if source == "reward":
        return 0
    return int(shape[-1]) if len(shape) > 2 else 0
