"""House rule: the device side (runtime, devices, the CLI entry) never imports torch nor Ray
(Ray is the backend-side ``fleet-sim``'s, imported lazily by ``devices.fleet_sim`` alone);
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
    "import devices.fleet_sim",  # the fleet simulator imports ray only when it runs on Ray
]
#: Never loaded by the probes: torch, Ray, and (unless asked for) the fleet simulator.
FORBIDDEN = ("torch", "ray", "devices.fleet_sim")


@pytest.mark.parametrize("code", PROBES)
def test_device_side_imports_do_not_load_torch_or_ray(code: str) -> None:
    forbidden = [m for m in FORBIDDEN if f"import {m}" not in code]
    probe = f"{code}\nimport sys\nassert not {{*sys.modules}} & {{*{forbidden!r}}}, 'imported'"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(("code", "module"), [("import training.networks", "torch"),
                                             ("import ray", "ray")])  # fmt: skip
def test_the_probe_detects_torch_and_ray_when_they_are_imported(code: str, module: str) -> None:
    pytest.importorskip(module)
    probe = f"{code}, sys\nassert {module!r} not in sys.modules"
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
