"""The torch-free runtime Agent: same numbers as torch, O(1) belief, batching, forgetting and
change points, OOD events, bad input, and the self-test used by the device health gate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_fixtures import SMALL, cached_bundle, cached_run

from runtime.agent import Agent, AgentConfig, InputError, evaluate_bundle
from runtime.bundle import read_manifest
from runtime.evaluation import held_out_tasks, rollout
from runtime.posterior import product_of_gaussians
from runtime.providers import CPU
from runtime.session import GraphSession
from runtime.tasks import make_family
from runtime.transition import encode_transition
from training.checkpoint import load_run
from training.evaluate import evaluate_run, policy_for

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return cached_bundle(tmp_path_factory, int8=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return cached_run(tmp_path_factory)


def make_agent(bundle: Path, **cfg) -> Agent:
    return Agent.load(bundle, config=AgentConfig(warmup=1, **cfg))


def transitions(n: int, seed: int = 0, reward_shift: float = 0.0) -> list[tuple]:
    """A chained point-nav-like trajectory of ``n`` (obs, action, reward, next_obs)."""
    rng = np.random.default_rng(seed)
    obs = np.zeros(2, dtype=np.float32)
    out = []
    for _ in range(n):
        act = rng.uniform(-1, 1, 2).astype(np.float32)
        nxt = (obs + 0.1 * act).astype(np.float32)
        out.append((obs, act, float(-np.linalg.norm(nxt - 0.5) + reward_shift), nxt))
        obs = nxt
    return out


def feed(agent: Agent, trans: list[tuple]) -> None:
    for o, a, r, n in trans:
        agent.observe(o, a, r, n)


# -- the runtime never needs torch ----------------------------------------------------------
def test_runtime_imports_neither_torch_nor_onnx():
    code = (
        "import sys, runtime.agent, runtime.bundle, runtime.bench, runtime.commands, "
        "runtime.trt, runtime.selftest, runtime.coldstart, runtime.ood; "
        "bad = [m for m in ('torch', 'onnx') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# -- same numbers as the torch evaluation ---------------------------------------------------
def test_evaluate_bundle_matches_the_torch_evaluation(bundle, run_dir):
    onnx_report = evaluate_bundle(bundle, "test", tasks=10, episodes=2, seed=3)
    torch_report = evaluate_run(run_dir, "test", episodes=2, tasks=10, seed=3)
    for ours, theirs in (
        (onnx_report.return_by_episode, torch_report.return_by_episode),
        (onnx_report.nonadaptive_return_by_episode, torch_report.nonadaptive_return_by_episode),
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-3)  # the issue asks for 1%
    assert onnx_report.random_return == pytest.approx(torch_report.random_return)
    assert set(onnx_report.to_dict()) == set(torch_report.to_dict())


def test_actions_match_the_torch_policy_step_by_step(bundle, run_dir):
    run = load_run(run_dir)
    env = run.config.env.name
    tasks = held_out_tasks(make_family(env, 1), "test", 4, 0)
    recorded: list[np.ndarray] = []

    class Recorder:
        def __init__(self, inner):
            self.inner = inner

        def begin_task(self, t):
            self.inner.begin_task(t)

        def begin_episode(self):
            self.inner.begin_episode()

        def act(self, obs):
            a = self.inner.act(obs)
            recorded.append(a.copy())
            return a

        def observe(self, *args):
            self.inner.observe(*args)

    rollout(Recorder(make_agent(bundle)), env, tasks, 2, 0)
    ours = np.stack(recorded)
    recorded.clear()
    rollout(Recorder(policy_for(run)), env, tasks, 2, 0)
    np.testing.assert_allclose(ours, np.stack(recorded), atol=1e-5)


# -- belief: O(1) natural parameters equal the closed form --------------------------------
def test_running_belief_equals_the_closed_form_product(bundle):
    manifest = read_manifest(bundle)
    agent = make_agent(bundle)
    trans = transitions(300)
    feed(agent, trans)
    enc = GraphSession(bundle / "encoder.onnx", manifest.graph("encoder"), providers=[CPU])
    x = np.concatenate([encode_transition(o[None], a[None], [r], n[None]) for o, a, r, n in trans])
    f = enc.run_feeds({"transition": x})
    mean, var = product_of_gaussians(f["mu"], f["var"], manifest.adaptation.prior_var)
    b = agent.belief
    assert b.count == 300 and b.skipped == 0
    np.testing.assert_allclose(b.mean, mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b.var, var, rtol=1e-4)


def test_belief_is_invariant_to_transition_order(bundle):
    trans = transitions(50, seed=4)
    a, b = make_agent(bundle), make_agent(bundle)
    feed(a, trans)
    feed(b, trans[::-1])
    np.testing.assert_allclose(a.belief.mean, b.belief.mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a.belief.var, b.belief.var, rtol=1e-5)


def test_belief_state_size_does_not_grow_with_context(bundle):
    agent = make_agent(bundle, outlier_factor=None)  # absorb all 2000 (untrained encoder)
    before = [arr.nbytes for arr in (*agent.state.values(), agent._count)]
    feed(agent, transitions(2000))
    assert [arr.nbytes for arr in (*agent.state.values(), agent._count)] == before
    assert agent.belief.count == 2000


def test_reset_returns_to_the_prior(bundle):
    agent = make_agent(bundle)
    feed(agent, transitions(10))
    agent.reset()
    b = agent.belief
    manifest = read_manifest(bundle)
    assert b.count == 0
    np.testing.assert_array_equal(b.mean, 0.0)
    np.testing.assert_allclose(b.var, manifest.adaptation.prior_var)


# -- non-stationary tasks ------------------------------------------------------------------
def switch_episode(switch_at: int, steps: int, seed: int = 0) -> list[tuple]:
    """Transitions of one point-nav episode whose goal jumps mid-episode (env.set_tasks)."""
    env = make_family("point-nav", 1)
    rng = np.random.default_rng(seed)
    goal_a, goal_b = np.array([[1.0, 0.0]]), np.array([[-1.0, 0.0]])
    obs = env.reset(goal_a, rng)
    out = []
    for t in range(steps):
        if t == switch_at:
            env.set_tasks(goal_b)  # the wind changed: same episode, new task
        act = rng.uniform(-1, 1, (1, 2)).astype(np.float32)
        res = env.step(act)
        out.append((obs[0], act[0], float(res.reward[0]), res.obs[0]))
        obs = res.obs
    return out


def test_forgetting_tracks_a_mid_episode_task_switch(bundle):
    """After the goal jumps mid-episode, a forgetting belief converges to what a fresh agent
    infers from the new task's transitions alone; without forgetting the old task keeps its
    weight."""
    trans = switch_episode(switch_at=60, steps=100)
    gaps, start_gaps = {}, {}
    for forget in (0.8, 1.0):
        fresh = make_agent(bundle, forget=forget)  # knows only the new task
        feed(fresh, trans[60:])
        agent = make_agent(bundle, forget=forget)
        feed(agent, trans[:60])
        start_gaps[forget] = np.abs(agent.belief.mean - fresh.belief.mean).max()
        feed(agent, trans[60:])
        gaps[forget] = np.abs(agent.belief.mean - fresh.belief.mean).max()
    assert gaps[0.8] < start_gaps[0.8] / 100  # the old task is forgotten ...
    assert gaps[1.0] > 20 * gaps[0.8]  # ... which it is not without forgetting


def test_sustained_alarm_resets_the_belief_and_raises_events(bundle):
    agent = make_agent(bundle, changepoint="reset", changepoint_patience=2)
    feed(agent, transitions(100, seed=5))
    assert agent.belief.count == 100
    agent.drain_events()
    # evidence far outside anything seen at calibration: rewards of +50
    feed(agent, transitions(5, seed=6, reward_shift=50.0))
    kinds = [e.kind for e in agent.drain_events()]
    assert "ood_alarm" in kinds and "changepoint_reset" in kinds
    assert agent.ood_score > read_manifest(bundle).ood.alarm
    # the count restarted at the reset: only the evidence since the change point is in it
    assert agent.belief.count < 5


def test_ood_events_fire_on_crossing_not_on_every_step(bundle):
    agent = make_agent(bundle)  # changepoint "off": events only
    feed(agent, transitions(50, seed=7))
    agent.drain_events()
    feed(agent, transitions(6, seed=8, reward_shift=50.0))
    alarms = [e for e in agent.drain_events() if e.kind == "ood_alarm"]
    assert len(alarms) == 1 and alarms[0].value > read_manifest(bundle).ood.alarm


# -- batched mode ---------------------------------------------------------------------------
def test_batched_agents_equal_independent_agents(bundle):
    n = 5
    trajs = [transitions(30, seed=s) for s in range(n)]
    batch = make_agent(bundle)
    batch.reset(n)
    actions = []
    for t in range(30):
        o = np.stack([tr[t][0] for tr in trajs])
        a = np.stack([tr[t][1] for tr in trajs])
        r = np.array([tr[t][2] for tr in trajs], dtype=np.float32)
        nx = np.stack([tr[t][3] for tr in trajs])
        actions.append(batch.act(o))
        batch.observe(o, a, r, nx)
    for i, tr in enumerate(trajs):
        single = make_agent(bundle)
        for t, (o, a, r, nx) in enumerate(tr):
            np.testing.assert_allclose(single.act(o), actions[t][i], atol=1e-6)
            single.observe(o, a, r, nx)
        np.testing.assert_allclose(single.belief.mean, batch.belief.mean[i], atol=1e-6)


# -- bad input ------------------------------------------------------------------------------
def test_wrong_shape_names_expected_and_got(bundle):
    agent = make_agent(bundle)
    with pytest.raises(InputError, match=r"obs: expected .*shape \(2,\) or \(1, 2\).*\(3,\)"):
        agent.act(np.zeros(3, dtype=np.float32))
    with pytest.raises(InputError, match=r"action: .*got float32 array of shape \(1, 3\)"):
        agent.observe(np.zeros(2), np.zeros((1, 3), np.float32), 0.0, np.zeros(2))
    agent.reset(4)
    with pytest.raises(InputError, match=r"expected .*\(4, 2\).*shape \(2,\)"):
        agent.act(np.zeros(2, dtype=np.float32))
    with pytest.raises(InputError, match="reward: expected 4"):
        agent.observe(np.zeros((4, 2)), np.zeros((4, 2)), np.zeros(3), np.zeros((4, 2)))


def test_wrong_dtype_names_expected_and_got(bundle):
    agent = make_agent(bundle)
    with pytest.raises(InputError, match=r"expected a float32 array .* got int64"):
        agent.act(np.zeros(2, dtype=np.int64))
    with pytest.raises(InputError, match="got <U1"):
        agent.act(np.array(["a", "b"]))
    with pytest.raises(InputError, match="reward"):
        agent.observe(np.zeros(2), np.zeros(2), "high", np.zeros(2))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["obs", "action", "reward", "next_obs"])
def test_nonfinite_transition_is_skipped_and_counted(bundle, bad, where):
    agent = make_agent(bundle)
    feed(agent, transitions(5))
    belief = agent.belief
    o, a, r, n = (x.copy() if isinstance(x, np.ndarray) else x for x in transitions(1, 9)[0])
    if where == "reward":
        r = bad
    else:
        {"obs": o, "action": a, "next_obs": n}[where][0] = bad
    agent.observe(o, a, r, n)
    after = agent.belief
    assert after.count == belief.count and after.skipped == 1
    np.testing.assert_array_equal(after.mean, belief.mean)
    assert [e.kind for e in agent.drain_events()][-1] == "nonfinite_input"


def test_nonfinite_rows_do_not_touch_the_other_agents(bundle):
    agent = make_agent(bundle)
    agent.reset(3)
    o = np.zeros((3, 2), np.float32)
    r = np.array([-1.0, np.nan, -1.0], dtype=np.float32)
    agent.observe(o, np.zeros((3, 2), np.float32), r, o + 0.1)
    b = agent.belief
    assert b.count.tolist() == [1, 0, 1] and b.skipped.tolist() == [0, 1, 0]
    np.testing.assert_array_equal(b.mean[1], 0.0)
    assert np.abs(b.mean[0]).max() > 0


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_int8_and_fp32_refuse_a_nan_row_alike(bundle, precision):
    agent = make_agent(bundle, precision=precision)
    agent.reset(2)
    o = np.zeros((2, 2), np.float32)
    agent.observe(o, o, np.array([np.nan, -1.0]), o + 0.1)
    assert agent.belief.count.tolist() == [0, 1]
    assert np.isfinite(agent.belief.mean).all()


def test_fallback_modes(bundle):
    nan_obs = np.array([np.nan, 0.0], dtype=np.float32)
    good = np.array([0.3, -0.2], dtype=np.float32)
    zeros = make_agent(bundle, fallback="zeros")
    np.testing.assert_array_equal(zeros.act(nan_obs), 0.0)  # physical 0 in [-1, 1] bounds
    hold = make_agent(bundle, fallback="hold")
    last = hold.act(good)
    np.testing.assert_array_equal(hold.act(nan_obs), last)
    policy = make_agent(bundle, fallback="policy")
    at_good = policy.act(good)
    np.testing.assert_allclose(policy.act(nan_obs), at_good, atol=1e-7)
    kinds = [e.kind for e in policy.drain_events()]
    assert kinds == ["fallback_action"]


def test_act_scaled_and_step_return_physical_actions(bundle):
    agent = make_agent(bundle)
    manifest = read_manifest(bundle)
    low, high = np.array(manifest.act.low), np.array(manifest.act.high)
    obs = np.array([0.1, 0.2], dtype=np.float32)
    scaled = agent.act_scaled(obs)
    np.testing.assert_allclose(scaled, low + (high - low) / 2 * (agent.act(obs) + 1), atol=1e-6)
    a0 = agent.step(obs)
    agent.step(obs + 0.05, reward=-1.0)
    assert agent.belief.count == 1
    np.testing.assert_allclose(a0, scaled, atol=1e-6)
    agent.step(obs, reward=-1.0, done=True)
    agent.step(obs)  # new episode: no transition across the boundary
    assert agent.belief.count == 2


def test_cached_action_is_refreshed_when_obs_differs(bundle):
    agent = make_agent(bundle)
    o, a, r, n = transitions(1)[0]
    agent.observe(o, a, r, n)
    cached = agent.act(n)
    other = agent.act(n + 0.5)
    fresh = make_agent(bundle)
    fresh.observe(o, a, r, n)
    np.testing.assert_allclose(other, fresh.act(n + 0.5), atol=1e-6)
    np.testing.assert_allclose(cached, fresh.act(n), atol=1e-6)


# -- self-test (device health gate) ---------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_self_test_passes_on_a_good_bundle(bundle, precision):
    agent = make_agent(bundle, precision=precision)
    report = agent.self_test(steps=50)
    assert report.passed, report.reasons
    assert report.max_abs_err < 1e-4 and report.step_us_median > 0


def test_self_test_fails_when_expected_outputs_disagree(bundle, tmp_path):
    import shutil

    copy = Path(shutil.copytree(bundle, tmp_path / "b"))
    manifest = read_manifest(copy)
    data = dict(np.load(copy / manifest.test_vectors))
    data["out/step/action"] = data["out/step/action"] + 0.01
    np.savez(copy / manifest.test_vectors, **data)
    agent = Agent(manifest, copy, config=AgentConfig(warmup=1))  # skip hash check on purpose
    report = agent.self_test(steps=10)
    assert not report.passed and "test vectors" in report.reasons[0]


def test_unknown_precision_graph_is_a_clear_error(tmp_path_factory):
    plain = cached_bundle(tmp_path_factory, SMALL)
    with pytest.raises(Exception, match="no graph 'step_int8'"):
        Agent.load(plain, config=AgentConfig(precision="int8"))


def test_agent_config_forget_out_of_range(bundle):
    with pytest.raises(InputError, match="forget"):
        make_agent(bundle, forget=1.5)


def test_non_adaptive_agent_never_updates(bundle):
    agent = make_agent(bundle, adaptive=False)
    feed(agent, transitions(10))
    assert agent.belief.count == 0


def test_load_state_gives_another_agent_the_same_state_and_actions(bundle):
    """A non-adaptive agent loaded with an adapted agent's state acts like it (the field
    runner's ``last_calm`` safe mode), and keeps that state while the other adapts on."""
    adapted, held = make_agent(bundle), make_agent(bundle, adaptive=False)
    feed(adapted, transitions(30))
    obs = np.array([0.3, -0.2], dtype=np.float32)
    assert not np.array_equal(held.act(obs), adapted.act(obs))  # the prior acts otherwise
    held.load_state(adapted.state)
    np.testing.assert_array_equal(held.act(obs), adapted.act(obs))
    snapshot = adapted.state
    feed(adapted, transitions(30, seed=1))
    feed(held, transitions(30, seed=1))
    for name, value in held.state.items():
        np.testing.assert_array_equal(value, snapshot[name])


def test_load_state_refuses_wrong_names_shapes_and_nonfinite_values(bundle):
    agent = make_agent(bundle)
    good = agent.state
    name = next(iter(good))
    with pytest.raises(InputError, match="expected the names"):
        agent.load_state({**good, "extra": good[name]})
    with pytest.raises(InputError, match=f"state\\['{name}'\\]: expected finite values of shape"):
        agent.load_state({**good, name: good[name][..., :1]})
    with pytest.raises(InputError, match="finite"):
        agent.load_state({**good, name: np.full_like(good[name], np.nan)})
    for key, value in agent.state.items():  # nothing was written
        np.testing.assert_array_equal(value, good[key])


def test_same_seed_same_numbers(bundle):
    a, b = make_agent(bundle), make_agent(bundle)
    feed(a, transitions(20))
    feed(b, transitions(20))
    np.testing.assert_array_equal(a.belief.mean, b.belief.mean)


# -- absurd but finite input (issue 17 part 4) ---------------------------------------------
@pytest.mark.parametrize("value", [1e3, 1e6, 1e30])
def test_an_absurd_observation_is_skipped_and_does_not_poison_the_state(bundle, value):
    clean, hit = make_agent(bundle), make_agent(bundle)
    trans = transitions(30)
    feed(clean, trans[:10])
    feed(hit, trans[:10])
    absurd = np.full(2, value, dtype=np.float32)
    o, a, r, _ = trans[10]
    hit.observe(o, a, r, absurd)  # lands on an absurd reading
    hit.observe(absurd, a, r, trans[11][0])  # and leaves it
    action = hit.act(absurd)
    assert np.isfinite(action).all() and np.abs(action).max() <= 1.0
    kinds = [e.kind for e in hit.drain_events()]
    assert kinds.count("out_of_bounds_input") == 2 and "fallback_action" in kinds
    assert hit.belief.skipped == 2 and hit.belief.count == 10
    feed(clean, trans[12:])
    feed(hit, trans[12:])
    for name, arr in clean.state.items():  # the glitch left no trace in the state
        np.testing.assert_array_equal(hit.state[name], arr)


def test_a_lone_outlier_is_rejected_but_a_persistent_change_is_absorbed(bundle):
    agent = make_agent(bundle)
    trans = transitions(40)
    feed(agent, trans[:30])
    before = agent.state
    o, a, _, n = trans[30]
    agent.observe(o, a, 1e6, n)  # finite, in bounds, absurd reward: surprise far off
    assert [e.kind for e in agent.drain_events()][-1] == "outlier_rejected"
    for name, arr in before.items():
        np.testing.assert_array_equal(agent.state[name], arr)
    patience = agent.config.outlier_patience
    for _ in range(patience - 1):  # it persists: from the patience-th one on, it is absorbed
        agent.observe(o, a, 1e6, n)
    assert agent.belief.count == 31 and agent.belief.skipped == patience - 1


def test_input_errors_name_the_argument_the_caller_passed(bundle):
    agent = make_agent(bundle)
    agent.step(np.zeros(2, np.float32))
    with pytest.raises(InputError, match=r"^obs: expected"):
        agent.step(np.zeros(3, np.float32), -1.0)
    with pytest.raises(InputError, match=r"^next_obs: expected"):
        agent.observe(np.zeros(2, np.float32), np.zeros(2, np.float32), 0.0, np.zeros(5))
