"""Property-based fuzzing of the runtime Agent with hypothesis.

Whatever finite, huge, NaN or infinite numbers arrive, in whatever order of calls: actions are
finite and within bounds, the belief stays finite with a positive variance, every observe is
either absorbed or counted as skipped, and malformed arrays raise InputError (never anything
else).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bundle_fixtures import cached_bundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from runtime.agent import Agent, AgentConfig, InputError

ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True, width=32)
WILD = st.one_of(
    st.floats(-3, 3, width=32),
    ANY_FLOAT,
    st.sampled_from([np.nan, np.inf, -np.inf, 3e38, -3e38, 1e-45]),
)
VEC2 = arrays(np.float32, 2, elements=WILD)
VEC2_64 = arrays(np.float64, 2, elements=st.one_of(WILD, st.floats(allow_nan=True)))

OP = st.one_of(
    st.tuples(st.just("act"), VEC2),
    st.tuples(st.just("act64"), VEC2_64),
    st.tuples(st.just("observe"), st.tuples(VEC2, VEC2, WILD, VEC2)),
    st.tuples(st.just("step"), st.tuples(VEC2, st.one_of(st.none(), WILD), st.booleans())),
)
FUZZ = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_AGENTS: dict[str, Agent] = {}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return cached_bundle(tmp_path_factory, int8=True)


def agent_for(bundle: Path, fallback: str, precision: str = "fp32") -> Agent:
    key = f"{fallback}-{precision}"
    if key not in _AGENTS:
        cfg = AgentConfig(fallback=fallback, precision=precision, warmup=1, changepoint="reset")
        _AGENTS[key] = Agent.load(bundle, config=cfg)
    agent = _AGENTS[key]
    agent.reset(1)
    agent.drain_events()
    return agent


def check_action(agent: Agent, action: np.ndarray, scaled: bool) -> None:
    low = np.array(agent.manifest.act.low) if scaled else -1.0
    high = np.array(agent.manifest.act.high) if scaled else 1.0
    assert action.shape == (agent.manifest.act.dim,)
    assert np.isfinite(action).all()
    assert (action >= low).all() and (action <= high).all()


def check_belief(agent: Agent, observes: int) -> None:
    b = agent.belief
    assert np.isfinite(b.mean).all() and np.isfinite(b.var).all() and (b.var > 0).all()
    assert b.count + b.skipped <= observes  # change-point resets may zero the count


@pytest.mark.parametrize(
    ("fallback", "precision"), [("zeros", "fp32"), ("hold", "fp32"), ("policy", "int8")]
)
@FUZZ
@given(ops=st.lists(OP, min_size=1, max_size=25))
def test_actions_and_belief_stay_safe_under_any_input(bundle, fallback, precision, ops):
    agent = agent_for(bundle, fallback, precision)
    observes = 0
    for kind, payload in ops:
        if kind in ("act", "act64"):
            check_action(agent, agent.act(payload), scaled=False)
        elif kind == "observe":
            obs, act, rew, nxt = payload
            agent.observe(obs, act, rew, nxt)
            observes += 1
        else:
            obs, rew, done = payload
            had_prev = agent._prev_obs is not None
            check_action(agent, agent.step(obs, rew, done), scaled=True)
            observes += int(had_prev and rew is not None)
        check_belief(agent, observes)


@FUZZ
@given(
    shape=st.sampled_from([(), (1,), (3,), (2, 2), (1, 3), (0,)]),
    dtype=st.sampled_from([np.float32, np.int32, np.bool_, np.complex64]),
)
def test_malformed_arrays_raise_input_error(bundle, shape, dtype):
    agent = agent_for(bundle, "hold")
    bad = np.zeros(shape, dtype=dtype)
    ok_shape = shape in ((2,), (1, 2))
    if ok_shape and dtype == np.float32:
        return
    with pytest.raises(InputError):
        agent.act(bad)
    with pytest.raises(InputError):
        agent.observe(np.zeros(2, np.float32), bad, 0.0, np.zeros(2, np.float32))


@FUZZ
@given(
    rows=st.integers(1, 6),
    data=st.data(),
)
def test_batched_agents_stay_safe(bundle, rows, data):
    agent = agent_for(bundle, "zeros")
    agent.reset(rows)
    mat = arrays(np.float32, (rows, 2), elements=WILD)
    for _ in range(5):
        obs, act, nxt = data.draw(mat), data.draw(mat), data.draw(mat)
        rew = data.draw(arrays(np.float32, rows, elements=WILD))
        a = agent.act(obs)
        assert a.shape == (rows, 2) and np.isfinite(a).all() and (np.abs(a) <= 1).all()
        agent.observe(obs, act, rew, nxt)
        b = agent.belief
        assert np.isfinite(b.mean).all() and (b.var > 0).all()
