"""``edgeadapt bench tracking``: the same tasks for every controller, the convergence measure,
bundles flown adaptive and non-adaptive through the runtime, clear errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from bundle_fixtures import SMALL, cached_bundle, cached_run

from runtime.cli import main
from runtime.tasks import tracking


def bench(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    rc = main(["bench", "tracking", "--tasks", "2", "--episodes", "1", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_convergence_counts_steps_until_the_error_stays_near_steady() -> None:
    steady = np.full((40, 3), 2.0)
    switched = steady.copy()
    switched[:5, 0] = 50.0  # back after 5 steps
    switched[:5, 1] = 50.0
    switched[20, 1] = 80.0  # a relapse: converged only after it
    switched[:, 2] = 50.0  # never
    steps = tracking.convergence_steps(switched, steady)
    assert steps.tolist() == [5, 21, 40 - tracking.WINDOW + 1]


def test_classical_controllers_on_the_same_tasks(capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = bench(capsys, "--json")
    assert rc == 0
    report = json.loads(out)
    assert report["conditions"]["storm 14.5+2sin(t)"]["splits"] == {"ood": 2}
    assert "ood" not in report["conditions"]["12.1"]["splits"]
    ctrl = report["controllers"]
    assert set(ctrl) == {"PD (no integral)", "PID", "DOB", "privileged"}
    for res in ctrl.values():
        for cond in res["conditions"].values():
            assert 0.0 < cond["mean_cm"] <= cond["p95_cm"] < 400.0
    at_12 = {k: v["conditions"]["12.1"]["mean_cm"] for k, v in ctrl.items()}
    assert at_12["DOB"] < at_12["PID"] < at_12["PD (no integral)"], at_12
    change = {k: v["wind_change"]["converge_steps_mean"] for k, v in ctrl.items()}
    assert change["privileged"] < change["PID"], change
    # deterministic: the same command gives the same numbers
    assert json.loads(bench(capsys, "--json")[1])["controllers"] == ctrl


def test_markdown_table(capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = bench(capsys, "--markdown")
    lines = out.strip().splitlines()
    assert rc == 0 and lines[0].startswith("| controller | 4.2 m/s")
    rows = [line.split(" | ")[0] for line in lines[2:]]
    assert rows == ["| PD (no integral)", "| PID", "| DOB", "| privileged"]


def test_a_bundle_flies_adaptive_and_non_adaptive(capsys, tmp_path_factory) -> None:
    bundle = cached_bundle(tmp_path_factory, (*SMALL, "env.name=drone-track"))
    rc, out, _ = bench(capsys, "--json", "--bundle", str(bundle))
    assert rc == 0
    ctrl = json.loads(out)["controllers"]
    adaptive, fixed = ctrl["pearl"], ctrl["pearl, non-adaptive"]
    assert adaptive["kind"] == fixed["kind"] == "bundle"
    assert adaptive["adaptive"] and not fixed["adaptive"]
    a, f = adaptive["conditions"]["8.5"]["mean_cm"], fixed["conditions"]["8.5"]["mean_cm"]
    assert math.isfinite(a) and math.isfinite(f) and a != f
    # a declared param is set on the adaptive agent; undeclared ones are not applied
    args = ("--json", "--bundle", str(bundle), "--param", "forget=0.5", "--param", "other=1")
    ctrl = json.loads(bench(capsys, *args)[1])["controllers"]
    assert ctrl["pearl (forget=0.5)"]["params"] == {"forget": 0.5}
    assert ctrl["pearl, non-adaptive"]["params"] == {}
    assert ctrl["pearl (forget=0.5)"]["conditions"] != adaptive["conditions"]
    # a name given twice: one adaptive row per value, one non-adaptive row
    args = ("--json", "--bundle", str(bundle), "--param", "forget=0.5", "--param", "forget=1")
    rows = json.loads(bench(capsys, *args)[1])["controllers"]
    assert [k for k in rows if k.startswith("pearl")] == [
        "pearl (forget=0.5)", "pearl (forget=1)", "pearl, non-adaptive"
    ]  # fmt: skip
    assert rows["pearl (forget=0.5)"]["conditions"] == ctrl["pearl (forget=0.5)"]["conditions"]
    assert tracking.param_sets([("a", 1), ("b", 2), ("a", 3)]) == [
        {"a": 1, "b": 2}, {"a": 3, "b": 2}
    ]  # fmt: skip


def test_a_residual_bundle_flies_on_its_own_family(capsys, tmp_path_factory) -> None:
    """drone-track-residual's actions are force corrections to the onboard PD: the bench flies
    it there (the same plant and noise), not as thrust commands."""
    from runtime.agent import Agent
    from runtime.bundle import load_verified

    bundle = cached_bundle(tmp_path_factory, (*SMALL, "env.name=drone-track-residual"))
    rc, out, _ = bench(capsys, "--json", "--bundle", str(bundle))
    assert rc == 0
    row = json.loads(out)["controllers"]["pearl"]
    assert row["family"] == "drone-track-residual"
    manifest = load_verified(bundle)
    for family, same in (("drone-track-residual", True), ("drone-track", False)):
        conditions, _ = tracking.evaluate(
            lambda: Agent(manifest, bundle), 2, 1, 2.0, 0, False, family
        )
        assert (conditions == row["conditions"]) is same, family
    assert json.loads(out)["controllers"]["PID"]["family"] == "drone-track"
    # beside a residual controller: its onboard PD alone, on the residual family
    pd = json.loads(out)["controllers"]["onboard PD (residual, no correction)"]
    assert pd["family"] == "drone-track-residual" and not pd["adaptive"]
    residual = "drone-track-residual"
    zero, _ = tracking.evaluate(tracking.ZeroCorrection, 2, 1, 2.0, 0, False, residual)
    assert pd["conditions"] == zero
    assert pd["conditions"]["12.1"]["mean_cm"] > pd["conditions"]["4.2"]["mean_cm"] > 1.0


def test_a_bundle_of_another_family_is_refused(capsys, tmp_path_factory) -> None:
    bundle = cached_bundle(tmp_path_factory)  # point-nav
    rc, _, err = bench(capsys, "--bundle", str(bundle))
    assert rc == 2 and "not one of 'drone-track', 'drone-track-residual'" in err
    assert "Traceback" not in err
    rc, _, err = bench(capsys, "--skip", "12")
    assert rc == 2 and err.startswith("error: --skip")
    with pytest.raises(SystemExit) as exc:
        bench(capsys, "--param", "forget")
    assert exc.value.code == 2 and "expected NAME=VALUE" in capsys.readouterr().err


def test_an_oracle_run_is_a_row_and_the_reference_of_the_targets(capsys, tmp_path_factory) -> None:
    """--oracle RUN flies a torch oracle run (told the wind change); the targets' oracle is,
    per condition, whichever privileged row (the oracle run or the classical one) tracks best."""
    from training.checkpoint import load_run
    from training.evaluate import policy_for

    oracle = cached_run(tmp_path_factory, (*SMALL, "env.name=drone-track", "algo=oracle"))
    bundle = cached_bundle(tmp_path_factory, (*SMALL, "env.name=drone-track"))
    rc, out, _ = bench(capsys, "--json", "--oracle", str(oracle), "--bundle", str(bundle))
    assert rc == 0
    report = json.loads(out)
    ctrl, t = report["controllers"], report["targets"]["pearl"]
    assert ctrl["oracle"]["kind"] == "oracle" and ctrl["oracle"]["source"] == str(oracle)
    for name in tracking.NEURAL_FLY:
        best = min(ctrl[k]["conditions"][name]["mean_cm"] for k in ("oracle", "privileged"))
        ref = t["oracle_by_condition"][name]
        assert ref in ("oracle", "privileged") and ctrl[ref]["conditions"][name]["mean_cm"] == best
        ratio = ctrl["pearl"]["conditions"][name]["mean_cm"] / best
        assert t["vs_oracle"][name] == pytest.approx(ratio, abs=1e-3)
    assert t["vs_oracle_met"] == all(r <= 1.2 for r in t["vs_oracle"].values())
    assert set(t["vs_pid"]) == {"8.5", "8.5+2.4sin(t)", "12.1"}
    # the oracle is told the new wind mid-flight
    policy = policy_for(load_run(oracle))
    tasks = tracking.condition_tasks(2, 0)
    policy.begin_task(tasks[:2])
    z0 = policy.z.copy()
    policy.set_tasks(tasks[-2:])
    assert not np.allclose(policy.z, z0)
    rc, out, _ = bench(capsys, "--markdown", "--oracle", str(oracle), "--bundle", str(bundle))
    assert "pearl: <= 0.5x its non-adaptive row" in out
    assert "<= 1.2x the best privileged row (" in out


def test_a_run_that_is_not_an_oracle_is_refused(capsys, tmp_path_factory) -> None:
    run = cached_run(tmp_path_factory, (*SMALL, "env.name=drone-track"))
    rc, _, err = bench(capsys, "--oracle", str(run))
    assert rc == 2 and "not an oracle run" in err and "Traceback" not in err
