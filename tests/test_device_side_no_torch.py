"""House rule: the device side (runtime, devices, the CLI entry) never imports torch, nor Ray;
the training side imports Ray only when a run or sweep asks for it."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBES = [
    "import runtime, devices",
    "import devices.runner, devices.field_commands, devices.flash, devices.telemetry.client",
    "import runtime.cli; runtime.cli.build_parser()",
    "import runtime.posterior, runtime.evaluation, runtime.tasks\n"
    "runtime.tasks.make_family('point-nav')",
]


@pytest.mark.parametrize("code", PROBES)
def test_device_side_imports_do_not_load_torch(code: str) -> None:
    probe = (
        f"{code}\nimport sys\nassert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_the_probe_detects_torch_when_it_is_imported() -> None:
    probe = "import training.networks, sys\nassert 'torch' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode != 0


def test_training_imports_ray_only_when_asked() -> None:
    probe = (
        "import training.pearl, training.rl2, training.maml, training.sweep, training.commands\n"
        "import training.rollouts, runtime.cli, sys\nruntime.cli.build_parser()\n"
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
