"""Device profiles: every built-in profile loads, is consistent, and bad files fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from devices.profiles import (
    PROFILE_DIR,
    DeviceProfile,
    available_profiles,
    check_budget,
    load_profile,
)
from runtime.errors import ConfigError, UnknownNameError

REQUIRED = {
    "jetson-orin-nano-8gb",
    "jetson-orin-nx-16gb",
    "jetson-agx-orin-64gb",
    "jetson-xavier-nx",
    "x86-cpu",
    "rpi-arm-cpu",
}


def test_required_profiles_are_available() -> None:
    assert set(available_profiles()) >= REQUIRED
    assert not any(name.startswith("_") for name in available_profiles())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_profile_loads_and_names_itself(name: str) -> None:
    profile = load_profile(name)
    assert isinstance(profile, DeviceProfile)
    assert profile.name == name
    assert profile.execution_providers[-1] == "CPUExecutionProvider"
    assert profile.step_budget_us <= profile.control_period_us
    assert profile.notes


def test_jetson_profiles_prefer_tensorrt_then_cuda_and_record_versions() -> None:
    for name in sorted(n for n in available_profiles() if n.startswith("jetson-")):
        profile = load_profile(name)
        assert profile.architecture == "aarch64"
        assert profile.execution_providers == (
            "TensorrtExecutionProvider",
            "CUDAExecutionProvider",
            "CPUExecutionProvider",
        )
        assert profile.software.jetpack and profile.software.tensorrt
    assert load_profile("jetson-orin-nano-8gb").software.tensorrt == "10.3"
    assert load_profile("jetson-xavier-nx").software.jetpack.startswith("5.")


def test_load_by_path_equals_load_by_name() -> None:
    assert load_profile(PROFILE_DIR / "x86-cpu.yaml") == load_profile("x86-cpu")


def test_unknown_name_lists_the_available_ones() -> None:
    with pytest.raises(UnknownNameError, match="x86-cpu"):
        load_profile("jetson-nano-typo")
    with pytest.raises(UnknownNameError):
        load_profile("_jetson-base")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "custom.yaml"
    path.write_text(text)
    return path


BASE = """
name: custom
description: test
architecture: x86_64
memory_budget_mb: 100
execution_providers: [CPUExecutionProvider]
precision: fp32
control_rate_hz: 100
step_budget_us: 500
max_opset: 17
"""


def test_unknown_key_fails_with_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE + "contol_rate: 3\n")
    with pytest.raises(ConfigError, match=r"custom\.yaml.*contol_rate.*unknown key"):
        load_profile(path)


def test_wrong_type_fails_with_key(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE.replace("precision: fp32", "precision: fp8"))
    with pytest.raises(ConfigError, match="precision"):
        load_profile(path)


def test_budget_longer_than_the_control_period_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE.replace("step_budget_us: 500", "step_budget_us: 20000"))
    with pytest.raises(ConfigError, match="control period"):
        load_profile(path)


def test_cpu_fallback_must_come_last(tmp_path: Path) -> None:
    text = BASE.replace("[CPUExecutionProvider]", "[CPUExecutionProvider, CUDAExecutionProvider]")
    with pytest.raises(ConfigError, match="must end with CPUExecutionProvider"):
        load_profile(_write(tmp_path, text))


def test_check_budget_names_each_violation() -> None:
    profile = load_profile("x86-cpu")
    assert check_budget(profile, step_us=profile.step_budget_us, rss_mb=1.0) == []
    assert check_budget(profile) == []
    over = check_budget(profile, step_us=profile.step_budget_us + 1, rss_mb=1e6)
    assert len(over) == 2
    assert "step latency" in over[0] and "x86-cpu" in over[0]
    assert "memory" in over[1]
    # NaN never passes a budget.
    assert check_budget(profile, step_us=float("nan"))
