"""The device install, as a device has it (issue #17, part 5).

The wheel is built from this checkout and installed, without its dependencies, into a fresh
virtualenv (no system site-packages). That venv sees only the core dependencies: a ``.pth`` file
points at a directory of links to exactly the distributions ``edgeadapt``'s core requirements pull
in (resolved from their metadata), so no extra (torch, onnx, gymnasium, matplotlib) is importable
there. Then it provisions a device root, flashes a signed bundle, self-tests and runs it; a
``sitecustomize`` import hook records any attempt to import torch; ``train`` and ``demo`` say
which extra they need in one line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
from bundle_fixtures import cached_bundle, cached_keys

ROOT = Path(__file__).resolve().parent.parent
CORE = ("numpy", "onnxruntime", "paho-mqtt", "pydantic", "pyyaml", "cryptography")

HOOK = """
import sys
class _Watch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            with open({log!r}, "a") as f:
                f.write(" ".join(sys.argv) + "\\n")
        return None
sys.meta_path.insert(0, _Watch())
"""


def _closure(names: tuple[str, ...]) -> set[str]:
    """Distributions the named ones need (no extras), the named ones included."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        dist = metadata.distribution(todo.pop())
        key = dist.metadata["Name"].lower()
        if key in seen:
            continue
        seen.add(key)
        for req in dist.requires or []:
            if "extra ==" in req or 'sys_platform == "win32"' in req:
                continue
            todo.append(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])
    return seen


def _link_core(target: Path) -> None:
    """Links in ``target`` to the top-level files of the core distributions only."""
    target.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for name in _closure(CORE):
        for f in metadata.distribution(name).files or []:
            top = f.parts[0]
            if top.endswith((".dist-info", ".pth")) or top in ("..", "__pycache__"):
                continue
            link = target / top
            if not link.exists() and (site / top).exists():
                link.symlink_to(site / top)
        info = metadata.distribution(name)._path  # type: ignore[attr-defined]
        (target / info.name).symlink_to(info)


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_with_core_dependencies_flashes_and_runs(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    bundle = cached_bundle(tmp_path_factory)
    _, pub = cached_keys(tmp_path_factory)
    wheels, venv, core = tmp_path / "wheels", tmp_path / "venv", tmp_path / "core"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", str(wheels), str(ROOT)], cwd=tmp_path)  # fmt: skip
    wheel = next(wheels.glob("edgeadapt-*.whl"))
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
          str(wheel)], cwd=tmp_path)  # fmt: skip
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).strip())  # fmt: skip
    _link_core(core)
    (site / "core_deps.pth").write_text(f"{core}\n")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}

    def edgeadapt(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([str(venv / "bin" / "edgeadapt"), *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert "Traceback" not in res.stderr, res.stderr
        assert (res.returncode == 0) == ok, (args, res.stdout, res.stderr)
        return res

    probe = subprocess.run([str(py), "-c", "import torch"], env=env, capture_output=True)
    assert probe.returncode != 0, "torch must not be importable in the device venv"
    where = _run([str(py), "-c", "import devices; print(devices.__file__)"], cwd=tmp_path, env=env)
    assert str(venv) in where, "the installed package, not the checkout"
    log = tmp_path / "torch-imports.log"  # from here on, any attempt to import torch is logged
    (site / "sitecustomize.py").write_text(HOOK.format(log=str(log)))

    dev = tmp_path / "dev"
    edgeadapt("device", "init", str(dev), "--profile", "x86-cpu", "--pubkey", str(pub))
    edgeadapt("flash", str(bundle), "--device-root", str(dev))
    assert "PASSED" in edgeadapt("selftest", str(bundle), "--pubkey", str(pub)).stdout
    edgeadapt("run", "--device-root", str(dev), "--episodes", "1", "--tasks", "1", "--fast",
              "--json")  # fmt: skip
    for args, extra in (
        (("train", str(ROOT / "configs/pearl/point-nav.yaml")), "train"),
        (("demo", "--out", "r"), "train"),
    ):
        err = edgeadapt(*args, ok=False).stderr
        line = [x for x in err.splitlines() if x.startswith("error:")]
        assert len(line) == 1 and f"pip install 'edgeadapt[{extra}]'" in line[0], err
    attempts = log.read_text().splitlines() if log.exists() else []
    assert any("edgeadapt train" in a for a in attempts), "the hook sees imports"
    device_side = [a for a in attempts if not re.search(r"edgeadapt (train|demo)", a)]
    assert device_side == [], f"torch was imported by: {device_side}"


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env or dict(os.environ), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, (cmd, res.stdout[-2000:], res.stderr[-3000:])
    return res.stdout
