"""One contract every meta-RL family and every policy implementation passes (dm_env style).

Parametrized over the registry's families (``TINY_CONFIGS``: a tiny real training run each) and
over the implementations of :class:`runtime.evaluation.AdaptivePolicy`: the torch policy of the
run, the exported bundle's :class:`runtime.agent.Agent`, the privileged oracle and the random
policy. A new family adds one entry to ``TINY_CONFIGS`` and must pass everything here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export.bundle_writer import ExportOptions, export_bundle
from runtime.agent import Agent, AgentConfig
from runtime.errors import BundleError
from runtime.evaluation import RandomPolicy, held_out_tasks, rollout
from runtime.tasks import make_family
from training.checkpoint import LoadedRun, load_run
from training.evaluate import policy_for
from training.registry import entry_of, validate_run_config

ENV = "point-nav"
LOOP = {"eval_every": 2, "checkpoint_every": 2, "num_threads": 1}
#: A few iterations of real training per family (seconds each).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "pearl": {
        "model": {"encoder_hidden": [32, 32], "hidden": [32, 32], "latent_dim": 3},
        "sac": {"batch_size": 32},
        "pearl": {"meta_batch": 4, "context_size": 16},
        "train": {"iterations": 2, "initial_episodes": 1, "tasks_per_iter": 4,
                  "updates_per_iter": 5, **LOOP},
    },
    "oracle": {
        "model": {"hidden": [32, 32]},
        "sac": {"batch_size": 32},
        "pearl": {"meta_batch": 4},
        "train": {"iterations": 2, "initial_episodes": 1, "tasks_per_iter": 4,
                  "updates_per_iter": 5, **LOOP},
    },
    "rl2": {
        "model": {"hidden_size": 16, "embed": [16], "head_hidden": [16]},
        "ppo": {"epochs": 1, "minibatches": 2},
        "train": {"iterations": 2, "trials_per_iter": 8, "episodes_per_trial": 2, **LOOP},
    },
    "maml": {
        "model": {"hidden": [16, 16]},
        "maml": {"episodes_per_step": 2, "meta_batch": 4, "outer_epochs": 1},
        "train": {"iterations": 2, **LOOP},
    },
}  # fmt: skip
FAMILIES = sorted(TINY_CONFIGS)
EXPORTABLE = [f for f in FAMILIES if entry_of(validate_run_config({"algo": f}, "x")).export_module]
_RUNS: dict[str, tuple[Path, Any]] = {}
_BUNDLES: dict[str, Path] = {}


def trained(algo: str, tmp_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """(run directory, the in-memory training state) of a tiny run, trained once per session."""
    if algo not in _RUNS:
        cfg = validate_run_config(
            {**TINY_CONFIGS[algo], "algo": algo, "env": {"name": ENV}, "eval": {"tasks": 4}},
            source="contract",
        )
        run_dir = tmp_factory.mktemp(f"contract-{algo}")
        state = entry_of(cfg).impl().train(cfg, run_dir, progress=False)
        _RUNS[algo] = (run_dir, state)
    return _RUNS[algo]


def bundle_of(algo: str, tmp_factory: pytest.TempPathFactory) -> Path:
    if algo not in _BUNDLES:
        run_dir, _ = trained(algo, tmp_factory)
        out = tmp_factory.mktemp(f"bundle-{algo}") / "b"
        export_bundle(run_dir, out, ExportOptions(calibration_tasks=8))
        _BUNDLES[algo] = out
    return _BUNDLES[algo]


def make_policy(kind: str, algo: str, tmp_factory: pytest.TempPathFactory, adaptive=True):
    run_dir, _ = trained(algo, tmp_factory)
    if kind == "torch":
        return policy_for(load_run(run_dir), adaptive)
    if kind == "bundle":
        return Agent.load(bundle_of(algo, tmp_factory), config=AgentConfig(adaptive=adaptive))
    return RandomPolicy(make_family(ENV).spec.act_dim, np.random.default_rng(0))


IMPLEMENTATIONS = [("torch", f) for f in FAMILIES] + [("bundle", f) for f in EXPORTABLE]
IMPLEMENTATIONS += [("random", "pearl")]
IDS = [f"{k}-{f}" for k, f in IMPLEMENTATIONS]


def tasks(n: int = 4) -> np.ndarray:
    return held_out_tasks(make_family(ENV), "test", n, seed=3)


# -- the contract ----------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "algo"), IMPLEMENTATIONS, ids=IDS)
def test_actions_have_the_batch_shape_and_lie_in_bounds(kind, algo, tmp_path_factory):
    policy = make_policy(kind, algo, tmp_path_factory)
    t = tasks(5)
    policy.begin_task(t)
    policy.begin_episode()
    obs = make_family(ENV, 5).reset(t, np.random.default_rng(0))
    action = policy.act(obs)
    assert action.shape == (5, make_family(ENV).spec.act_dim)
    assert np.isfinite(action).all() and np.abs(action).max() <= 1.0


@pytest.mark.parametrize(("kind", "algo"), IMPLEMENTATIONS, ids=IDS)
def test_same_seed_same_returns(kind, algo, tmp_path_factory):
    a = rollout(make_policy(kind, algo, tmp_path_factory), ENV, tasks(), 2, seed=5)
    b = rollout(make_policy(kind, algo, tmp_path_factory), ENV, tasks(), 2, seed=5)
    np.testing.assert_array_equal(a.returns_TE, b.returns_TE)


@pytest.mark.parametrize(("kind", "algo"), [i for i in IMPLEMENTATIONS if i[0] != "random"],
                         ids=[i for i in IDS if not i.startswith("random")])  # fmt: skip
def test_begin_task_returns_to_the_initial_state(kind, algo, tmp_path_factory):
    """After adapting to one task, begin_task makes the policy act exactly like a fresh one."""
    used, fresh = (make_policy(kind, algo, tmp_path_factory) for _ in range(2))
    rollout(used, ENV, held_out_tasks(make_family(ENV), "train", 4, seed=9), 2, seed=1)
    np.testing.assert_array_equal(
        rollout(used, ENV, tasks(), 2, seed=2).returns_TE,
        rollout(fresh, ENV, tasks(), 2, seed=2).returns_TE,
    )


@pytest.mark.parametrize("algo", FAMILIES)
def test_save_then_load_gives_the_trained_models_actions(algo, tmp_path_factory):
    """The in-memory networks at the end of training and the run loaded from disk act alike."""
    run_dir, state = trained(algo, tmp_path_factory)
    loaded = load_run(run_dir)
    nets = entry_of(loaded.config).impl().nets_of(state)
    live = LoadedRun(run_dir, loaded.config, loaded.family, nets, {})
    t = tasks()
    np.testing.assert_array_equal(
        rollout(policy_for(live), ENV, t, 2, seed=4).returns_TE,
        rollout(policy_for(loaded), ENV, t, 2, seed=4).returns_TE,
    )


@pytest.mark.parametrize("algo", EXPORTABLE)
def test_bundle_acts_like_the_torch_policy(algo, tmp_path_factory):
    """torch vs onnxruntime on the protocol itself: the same returns to float32 rounding."""
    run_dir, _ = trained(algo, tmp_path_factory)
    # 3 episodes: for MAML (2 episodes per inner step) the third flies the adapted weights.
    torch_ret = rollout(policy_for(load_run(run_dir)), ENV, tasks(), 3, seed=6).returns_TE
    agent = Agent.load(bundle_of(algo, tmp_path_factory), config=AgentConfig(outlier_factor=None))
    ort_ret = rollout(agent, ENV, tasks(), 3, seed=6).returns_TE
    np.testing.assert_allclose(ort_ret, torch_ret, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("algo", EXPORTABLE)
def test_nan_fuzz_never_gives_a_non_finite_action(algo, tmp_path_factory):
    agent = Agent.load(bundle_of(algo, tmp_path_factory))
    rng = np.random.default_rng(0)
    spec = make_family(ENV).spec
    obs = np.zeros(spec.obs_dim, np.float32)
    for _ in range(300):
        nxt = rng.normal(0, 1, spec.obs_dim).astype(np.float32)
        nxt[rng.random(spec.obs_dim) < 0.2] = rng.choice([np.nan, np.inf, -np.inf, 1e30])
        reward = float(rng.choice([np.nan, -1.0, 1e38, np.inf]))
        action = agent.step(nxt, reward, done=bool(rng.random() < 0.05))
        assert np.isfinite(action).all()
        assert (action >= spec.act_low).all() and (action <= spec.act_high).all()
        obs = nxt
    assert agent.summary.skipped > 0 and obs is not None


@pytest.mark.parametrize("algo", EXPORTABLE)
def test_the_bundle_declares_its_state_and_the_runtime_pairs_it_by_name(algo, tmp_path_factory):
    agent = Agent.load(bundle_of(algo, tmp_path_factory))
    declared = agent.manifest.adaptation.state
    assert [s.name for s in declared] == list(agent.state)
    for spec in declared:
        np.testing.assert_array_equal(agent.state[spec.name][0], spec.initial(agent.bundle_dir))
    assert agent.summary.algorithm == algo
    run_dir, _ = trained(algo, tmp_path_factory)
    run = load_run(run_dir)  # ExportOptions(calibration_tasks=8): 8 train tasks were recorded
    rows = 8 * run.config.eval.episodes * run.family.spec.horizon
    assert agent.manifest.provenance["calibration"]["rows"] == rows


def test_an_unknown_family_runs_through_the_generic_declaration(tmp_path_factory, tmp_path):
    """A family the runtime has never heard of: only the declaration changes (algorithm name,
    state), and the shell runs it: the RL² graphs relabelled as "my-memory"."""
    import json
    import shutil

    from runtime.bundle import read_manifest

    copy = tmp_path / "b"
    shutil.copytree(bundle_of("rl2", tmp_path_factory), copy)
    data = json.loads((copy / "manifest.json").read_text())
    ad = data["adaptation"]
    data["adaptation"] = {"algorithm": "my-memory", "state": ad["state"], "info": {"k": 1}}
    (copy / "manifest.json").write_text(json.dumps(data))
    manifest = read_manifest(copy)
    agent = Agent(manifest, copy, config=AgentConfig(warmup=1))
    ret = rollout(agent, ENV, tasks(), 2, seed=6).returns_TE
    ref = rollout(Agent.load(bundle_of("rl2", tmp_path_factory)), ENV, tasks(), 2, seed=6)
    np.testing.assert_array_equal(ret, ref.returns_TE)
    assert agent.summary.algorithm == "my-memory" and agent.summary.mean.shape == (4, 8)


def test_demo_scores_an_episodic_family_on_its_adapted_episode(tmp_path_factory):
    """The demo's tracking comparison and storm flight score the last episode: for MAML that
    must be the adapted one (its exploration episodes, then one more), for the others the
    bench's 2 (a MAML demo once scored its 20th exploration episode of 20)."""
    from runtime.bundle import read_manifest
    from training.demo import scored_episodes

    maml = bundle_of("maml", tmp_path_factory)
    every = read_manifest(maml).adaptation.episodic.every_episodes
    assert scored_episodes(maml) == every + 1
    for algo in ("pearl", "rl2"):
        assert scored_episodes(bundle_of(algo, tmp_path_factory)) == 2


def test_maml_adapts_between_episodes_in_onnxruntime(tmp_path_factory):
    """The episodic declaration at work: after episodes_per_step episodes the runtime runs the
    adapt graph once per agent, the weights change, and the next episode flies them."""
    agent = Agent.load(bundle_of("maml", tmp_path_factory))
    t = tasks()
    theta = agent.state["weights"][0].copy()
    rollout(agent, ENV, t, 2, seed=1)
    events = [e for e in agent.drain_events() if e.kind in ("adapted", "adapt_rejected")]
    assert [e.kind for e in events] == ["adapted"] * len(t)
    assert all("step_norm" in e.detail and "time_us" in e.detail for e in events)
    assert not np.allclose(agent.state["weights"], theta)
    rollout(agent, ENV, t, 1, seed=1)  # begin_task: back to theta, no adaptation yet
    np.testing.assert_array_equal(agent.state["weights"], np.tile(theta, (len(t), 1)))


def test_int8_is_refused_for_a_family_with_weights_as_input(tmp_path_factory, tmp_path):
    """MAML's step graph takes its weights as an input: an explicit --int8 is a clear error,
    and nothing is written."""
    run_dir, _ = trained("maml", tmp_path_factory)
    out = tmp_path / "b"
    with pytest.raises(BundleError, match="--int8 is not available for this family: the policy"):
        export_bundle(run_dir, out, ExportOptions(calibration_tasks=8, int8=True))
    assert not out.exists()


@pytest.mark.parametrize("algo", EXPORTABLE)
def test_one_absurd_observation_leaves_no_trace_in_any_family(algo, tmp_path_factory):
    """Issue 17 part 4 for every family: a finite but absurd reading (1e6 everywhere) is
    refused like a non-finite one (event, fallback action within bounds), and the state
    afterwards matches that of an agent that never saw it (to float32 rounding: the glitch
    makes the next action come from the act graph instead of the step graph's cache)."""
    bundle = bundle_of(algo, tmp_path_factory)
    clean, hit = Agent.load(bundle), Agent.load(bundle)
    spec = make_family(ENV).spec
    trans = [(o.astype(np.float32), a, r, n.astype(np.float32)) for o, a, r, n in _walk(15)]
    for i, (o, a, r, n) in enumerate(trans):
        clean.observe(o, a, r, n)
        hit.observe(o, a, r, n)
        if i == 7:  # the glitch, then the agent sees real readings again
            absurd = np.full(spec.obs_dim, 1e6, np.float32)
            hit.observe(n, a, r, absurd)
            action = hit.act(absurd)
            assert np.isfinite(action).all() and np.abs(action).max() <= 1.0
            hit.observe(absurd, a, r, n)
    kinds = [e.kind for e in hit.drain_events()]
    assert kinds.count("out_of_bounds_input") == 2 and "fallback_action" in kinds
    assert hit.summary.skipped == 2 and hit.summary.count == clean.summary.count
    for name, arr in clean.state.items():
        np.testing.assert_allclose(hit.state[name], arr, rtol=1e-4, atol=1e-5)


def _walk(n: int) -> list[tuple]:
    """A point-nav trajectory of ``n`` (obs, normalized action, reward, next_obs)."""
    env = make_family(ENV, 1)
    rng = np.random.default_rng(2)
    obs = env.reset(tasks(1), rng)
    out = []
    for _ in range(n):
        a = rng.uniform(-1, 1, (1, env.spec.act_dim)).astype(np.float32)
        res = env.step(env.spec.act_low + (env.spec.act_high - env.spec.act_low) / 2 * (a + 1))
        out.append((obs[0], a[0], float(res.reward[0]), res.obs[0]))
        obs = res.obs
    return out


def test_an_adaptation_beyond_the_configured_limit_keeps_the_old_weights(tmp_path_factory):
    """The guard on an inner step: a step_norm limit below any real step refuses every
    adaptation (event, old weights kept); an unknown statistic is a clear error at load."""
    bundle = bundle_of("maml", tmp_path_factory)
    agent = Agent.load(bundle, config=AgentConfig(adapt_limits={"step_norm": 1e-9}))
    theta = agent.state["weights"][0].copy()
    rollout(agent, ENV, tasks(), 2, seed=1)
    events = [e for e in agent.drain_events() if e.kind.startswith("adapt")]
    assert [e.kind for e in events] == ["adapt_rejected"] * len(tasks())
    assert "over the limit: step_norm" in events[0].detail
    np.testing.assert_array_equal(agent.state["weights"], np.tile(theta, (len(tasks()), 1)))
    with pytest.raises(BundleError, match="adapt_limits"):
        Agent.load(bundle, config=AgentConfig(adapt_limits={"no_such_stat": 1.0}))


def test_bench_adapt_times_the_bundles_own_adapt_graph(tmp_path_factory):
    """``bench adapt`` replays the adaptation the bundle's agent ran on its own exploration
    episodes (a full buffer); a family without an episodic adaptation is a clear error."""
    from runtime.adapt_bench import bench_adapt
    from runtime.errors import BundleError

    res = bench_adapt(bundle_of("maml", tmp_path_factory), runs=5)
    horizon = make_family(ENV).spec.horizon
    assert res["episodes"] == 2 and res["transitions"] == res["capacity"] == 2 * horizon
    assert 0 < res["adapt_us_median"] <= res["adapt_us_p99"]
    with pytest.raises(BundleError, match="no episodic adaptation"):
        bench_adapt(bundle_of("pearl", tmp_path_factory), runs=1)
