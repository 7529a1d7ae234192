"""Device profiles: what a target can run and the budgets a bundle must meet on it.

A profile is a YAML file in ``configs/devices/`` (files starting with ``_`` are bases that others
``extends``). The files live in the package (``devices/profile_data/``, shipped as package data,
so a plain ``pip install edgeadapt`` on a device has them); ``configs/devices`` in a checkout is
a symbolic link to that directory, the place to edit them. Each is validated into
:class:`DeviceProfile`; unknown keys and wrong types fail at load time with the file and the
key. :func:`check_budget` compares a measured step latency and memory
against a profile; export, ``bench runtime --profile`` and the flashing health gate use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from runtime.configio import load_config
from runtime.errors import UnknownNameError

#: Where the built-in profiles live (package data; ``configs/devices`` in a checkout links here).
PROFILE_DIR = Path(__file__).resolve().parent / "profile_data"

Architecture = Literal["x86_64", "aarch64"]
Precision = Literal["fp32", "fp16", "int8"]
ExecutionProvider = Literal[
    "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
]
CPU_PROVIDER = "CPUExecutionProvider"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SoftwareStack(_Section):
    """Versions of the vendor software the profile was written for (documentation only)."""

    jetpack: str | None = Field(None, description="NVIDIA JetPack release, e.g. '6.x'")
    cuda: str | None = Field(None, description="CUDA version shipped with the OS image")
    tensorrt: str | None = Field(None, description="TensorRT version shipped with the OS image")
    onnxruntime: str | None = Field(None, description="which onnxruntime build the device runs")


class DeviceProfile(_Section):
    """One target device class and the budgets a bundle must meet on it."""

    name: str = Field(description="profile name; equals the YAML file's stem")
    description: str = Field(description="the hardware in one line")
    architecture: Architecture = Field(description="CPU architecture (platform.machine())")
    memory_budget_mb: float = Field(
        gt=0, description="peak resident memory (MB) the runtime process may use"
    )
    execution_providers: tuple[ExecutionProvider, ...] = Field(
        description="onnxruntime execution providers in order of preference; the CPU comes last"
    )
    precision: Precision = Field(description="preferred numeric precision of the graphs")
    control_rate_hz: float = Field(gt=0, description="control loop rate (Hz)")
    step_budget_us: float = Field(
        gt=0, description="per-step latency budget (µs) of act + observe; within one period"
    )
    max_opset: int = Field(
        ge=7, description="highest ONNX opset the device's runtime stack is known to execute"
    )
    health_timeout_s: float = Field(
        60.0, gt=0, description="time (s) the flashing health gate may take before it fails"
    )
    software: SoftwareStack = SoftwareStack()
    notes: str = Field("", description="versions, caveats and what was not verified")

    @model_validator(mode="after")
    def _consistent(self) -> DeviceProfile:
        if not self.execution_providers or self.execution_providers[-1] != CPU_PROVIDER:
            raise ValueError(f"execution_providers must end with {CPU_PROVIDER} (the fallback)")
        if len(set(self.execution_providers)) != len(self.execution_providers):
            raise ValueError("execution_providers lists a provider twice")
        if self.step_budget_us > self.control_period_us:
            raise ValueError(
                f"step_budget_us {self.step_budget_us:g} exceeds the control period "
                f"{self.control_period_us:g} µs at {self.control_rate_hz:g} Hz"
            )
        return self

    @property
    def control_period_us(self) -> float:
        """Length of one control period (µs)."""
        return 1e6 / self.control_rate_hz


def available_profiles(profile_dir: Path = PROFILE_DIR) -> list[str]:
    """Sorted names of the selectable built-in profiles (bases starting with ``_`` excluded)."""
    return sorted(p.stem for p in profile_dir.glob("*.yaml") if not p.name.startswith("_"))


def load_profile(name_or_path: str | Path, profile_dir: Path = PROFILE_DIR) -> DeviceProfile:
    """Load a profile by built-in name (``x86-cpu``) or by path to a YAML file."""
    path = _resolve(name_or_path, profile_dir)
    return load_config(path, DeviceProfile)


def check_budget(
    profile: DeviceProfile, step_us: float | None = None, rss_mb: float | None = None
) -> list[str]:
    """Violations of the profile's budgets, one sentence each; empty when everything fits.

    ``step_us`` is a measured per-step latency (µs, a median), ``rss_mb`` a peak resident
    memory (MB). A quantity passed as None is not checked.
    """
    violations: list[str] = []
    if step_us is not None and not step_us <= profile.step_budget_us:
        violations.append(
            f"step latency {step_us:.1f} µs exceeds the {profile.name} budget of "
            f"{profile.step_budget_us:g} µs"
        )
    if rss_mb is not None and not rss_mb <= profile.memory_budget_mb:
        violations.append(
            f"memory {rss_mb:.1f} MB exceeds the {profile.name} budget of "
            f"{profile.memory_budget_mb:g} MB"
        )
    return violations


def _resolve(name_or_path: str | Path, profile_dir: Path) -> Path:
    text = str(name_or_path)
    looks_like_path = isinstance(name_or_path, Path) or "/" in text or text.endswith(".yaml")
    if looks_like_path:
        return Path(name_or_path)
    path = profile_dir / f"{text}.yaml"
    if text.startswith("_") or not path.is_file():
        raise UnknownNameError(
            f"unknown device profile {text!r}; available: {', '.join(available_profiles())}"
        )
    return path
