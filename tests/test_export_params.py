"""``edgeadapt export --param NAME=VALUE``: a declared adaptation param's default baked into the
signed bundle (PEARL's ``forget`` for a device whose task changes in flight)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from bundle_fixtures import cached_run

from export.bundle_writer import ExportOptions, export_bundle
from export.verify import verify
from runtime.agent import Agent, AgentConfig
from runtime.bundle import read_manifest
from runtime.cli import main
from runtime.errors import ConfigError


@pytest.fixture(scope="module")
def forgetting_bundle(tmp_path_factory):
    run = cached_run(tmp_path_factory)
    out = tmp_path_factory.mktemp("params") / "b"
    export_bundle(run, out, ExportOptions(calibration_tasks=4, params={"forget": 0.9}))
    return run, out


def test_the_bundle_declares_the_default_and_the_agent_flies_it(forgetting_bundle):
    run, bundle = forgetting_bundle
    manifest = read_manifest(bundle)
    (forget,) = manifest.adaptation.params
    assert forget.name == "forget" and forget.default == 0.9
    assert manifest.provenance["param_defaults"] == {"forget": 0.9}
    res = verify(bundle, run_dir=run)  # test vectors recorded at 0.9 still match
    assert res.ok, res.reasons
    agent = Agent.load(bundle)
    assert agent._param_values() == {"forget": pytest.approx(0.9)}
    told = Agent.load(bundle, config=AgentConfig(params={"forget": 1.0}))
    assert told._param_values() == {"forget": 1.0}
    # The default acts: the same transitions leave a forgetting belief less precise.
    obs = np.zeros(manifest.obs.dim, np.float32)
    for a in (agent, told):
        for _ in range(30):
            a.observe(obs, a.act(obs), 0.0, obs)
    assert np.all(agent.belief.var > told.belief.var)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"forgett": 0.9},
            "export --param: pearl bundles have no param 'forgett'; they declare: forget",
        ),
        ({"forget": 1.5}, "export --param: forget must be in [0.001, 1.0], got 1.5"),
    ],
)
def test_an_undeclared_or_out_of_range_param_is_refused_and_writes_nothing(
    tmp_path_factory, tmp_path, params, message
):
    run = cached_run(tmp_path_factory)
    out = tmp_path / "b"
    with pytest.raises(ConfigError) as err:
        export_bundle(run, out, ExportOptions(calibration_tasks=4, params=params))
    assert message in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no bundle, no half-written temporary


def test_cli_export_param_sets_the_default(tmp_path_factory, tmp_path, capsys):
    run = cached_run(tmp_path_factory)
    out = tmp_path / "b"
    args = ["export", str(run), "--out", str(out), "--calibration-tasks", "4", "--json"]
    assert main([*args, "--param", "forget=0.95"]) == 0
    assert json.loads(capsys.readouterr().out)["bundle"] == str(out)
    assert read_manifest(out).adaptation.params[0].default == 0.95
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--force", "--param", "forget=nope"])
    assert exit_.value.code == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err
