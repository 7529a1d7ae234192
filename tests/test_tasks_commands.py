"""``edgeadapt envs`` and ``edgeadapt bench envs`` through the real command line entry point."""

from __future__ import annotations

import json

import pytest

from runtime.cli import main

BUILTINS = {"point-nav", "point-nav-sparse", "drone-wind", "car-friction"}


def test_envs_json_lists_every_builtin_with_dims_and_splits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["envs", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["families"]}
    assert set(rows) >= BUILTINS
    drone = rows["drone-wind"]
    assert (drone["obs_dim"], drone["act_dim"], drone["task_dim"]) == (4, 2, 4)
    assert drone["task_names"] == ["wind_x", "wind_z", "mass_scale", "fog_std"]
    assert drone["dt"] == 0.05 and set(drone["splits"]) == {"train", "test", "ood"}


def test_envs_text_names_every_family(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["envs"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}:" in out for name in BUILTINS)


def test_bench_envs_json_reports_a_median_rate_per_family(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["bench", "envs", "--json", "--batch", "16", "--steps", "30", "--repeats", "3"]
    assert main([*argv, "--family", "drone-wind", "--family", "car-friction"]) == 0
    result = json.loads(capsys.readouterr().out)["families"]
    assert set(result) == {"drone-wind", "car-friction"}
    for row in result.values():
        assert row["batch"] == 16 and len(row["runs_env_steps_per_s"]) == 3
        assert sorted(row["runs_env_steps_per_s"])[1] == row["env_steps_per_s"]


def test_bench_envs_unknown_family_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "envs", "--family", "no-such-env"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown env 'no-such-env'; available:") and "\n" not in err
    assert "drone-wind" in err
