"""Seed sweeps: one config trained and meta-tested under N seeds, summarized in one table.

Each seed is what ``edgeadapt bench training`` does (:func:`train_and_evaluate`): train the
config's privileged oracle where it names one (``eval.oracle_config`` or a sibling
``<config>-oracle.yaml``), then the family, then evaluate the splits with normalized scores. The
seeds run one after another in this process, or in parallel as plain Ray tasks (``--ray``), one
task per seed reserving ``train.num_threads`` CPUs. A task that ran on another node sends its run
directories back (without replay buffers) so the sweep folder is complete on the driver.

The table: for every split, metric and episode, the mean, std (population, ddof 0), min and max
over seeds; written as ``sweep.json`` and ``sweep.md``.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import ConfigError

log = logging.getLogger(__name__)

#: Per-episode metrics of an evaluation report that the table summarizes.
EPISODE_METRICS = (
    "return_by_episode",
    "normalized_by_episode",
    "nonadaptive_return_by_episode",
    "nonadaptive_normalized_by_episode",
    "success_by_episode",
)
#: Per-run scalars summarized too.
SCALARS = ("oracle_return", "random_return")
#: Files a remote seed does not send back (replay buffers: only needed to resume).
NOT_SENT = ("buffer.npz", "buffer.tmp.npz")

#: (role, done iterations, total iterations) reports of one run.
Report = Callable[[str, int, int], None]


@dataclass(frozen=True)
class RunPlan:
    """What one seed trains, in order: (role, validated config, run directory) per run. The
    configs travel with the plan, so a Ray task on another node needs no config files."""

    seed: int
    roles: tuple[tuple[str, Any, Path], ...]
    evaluate: Path  # the run directory that is meta-tested

    @property
    def iterations(self) -> tuple[int, ...]:
        return tuple(cfg.train.iterations for _, cfg, _ in self.roles)


def oracle_config_of(config: Path, cfg: Any, explicit: str | None = None) -> Path | None:
    """The oracle config a run of ``config`` is scored against, or None when it names none."""
    if explicit:
        return Path(explicit)
    if cfg.eval.oracle_config:  # relative to the config file that names it
        return config.parent / cfg.eval.oracle_config
    sibling = config.with_name(config.stem + "-oracle.yaml")
    return sibling if sibling.is_file() else None


def plan_run(
    config: Path, overrides: list[str], out: Path, oracle_config: str | None = None
) -> RunPlan:
    """The oracle (if the config names one) and the family run of ``config`` under ``out``
    (made absolute: Ray workers need not share the driver's working directory)."""
    from runtime.plugins import import_plugins
    from runtime.tasks import make_family
    from training.config import load_train_config

    out = out.resolve()
    main = load_train_config(config, overrides)
    import_plugins(main.env.plugins)
    make_family(main.env.name)  # an unknown family fails here, before any run starts
    oracle = oracle_config_of(config, main, oracle_config)
    roles: list[tuple[str, Any, Path]] = []
    if oracle is not None and main.algo != "oracle":
        oracle_dir = out / f"{config.stem}-oracle"
        roles.append(("oracle", load_train_config(oracle, overrides), oracle_dir))
        main = load_train_config(
            config, [*overrides, f"eval.oracle_run={json.dumps(str(oracle_dir))}"]
        )
    run_dir = out / f"{config.stem}-{main.algo}"
    roles.append((main.algo, main, run_dir))
    return RunPlan(main.seed, tuple(roles), run_dir)


def train_and_evaluate(
    plan: RunPlan, splits: list[str], progress: bool = False, report: Report | None = None
) -> dict[str, Any]:
    """Train every role of ``plan`` (fresh run directories), then meta-test its last run on
    ``splits``; one JSON-able dict (what ``bench training`` prints)."""
    from runtime.plugins import import_plugins
    from training.evaluate import evaluate_run
    from training.registry import entry_of

    result: dict[str, Any] = {"seed": plan.seed}
    for role, cfg, run_dir in plan.roles:
        shutil.rmtree(run_dir, ignore_errors=True)
        import_plugins(cfg.env.plugins)
        result["algo"], result["env"] = cfg.algo, cfg.env.name
        start = time.perf_counter()
        with watch(run_dir, role, cfg.train.iterations, report):
            state = entry_of(cfg).impl().train(cfg, run_dir, progress=progress)
        result[f"{role}_train_wall_s"] = round(time.perf_counter() - start, 1)
        result[f"{role}_env_steps"] = state.env_steps
        result[f"{role}_updates"] = getattr(state, "updates", None)
    for split in splits:
        result[split] = evaluate_run(plan.evaluate, split).to_dict()
    return result


@contextmanager
def watch(run_dir: Path, role: str, total: int, report: Report | None) -> Iterator[None]:
    """While a run trains, report its finished iterations (lines of its metrics.jsonl) about
    once a second from a thread; a no-op without ``report``."""
    if report is None:
        yield
        return
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(1.0):
            try:
                with (run_dir / "metrics.jsonl").open() as f:
                    done = sum(1 for _ in f)
            except OSError:
                done = 0
            report(role, done, total)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        report(role, total, total)


# -- the sweep ------------------------------------------------------------------------------------
def parse_seeds(text: str) -> list[int]:
    """``0-5`` or ``0,2,7`` or ``1-3,9`` -> the seeds, in order, without repeats."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            seeds += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected e.g. 0-5 or 0,2,7") from None
    if not seeds or min(seeds) < 0:
        raise ConfigError(f"--seeds {text!r}: expected non-negative seeds, e.g. 0-5")
    return list(dict.fromkeys(seeds))


def plan_sweep(
    config: Path, seeds: list[int], overrides: list[str], out: Path, oracle_config: str | None
) -> list[RunPlan]:
    """One plan per seed, each in ``out/seed-S``."""
    return [
        plan_run(config, [*overrides, f"seed={s}"], out / f"seed-{s}", oracle_config) for s in seeds
    ]


def run_sequential(plans: list[RunPlan], splits: list[str], progress: bool) -> list[dict]:
    """The embedded default: the seeds one after another in this process."""
    results = []
    for i, plan in enumerate(plans):
        log.info("seed %d (%d of %d)", plan.seed, i + 1, len(plans))
        results.append(train_and_evaluate(plan, splits, progress=progress))
    return results


def run_on_ray(
    plans: list[RunPlan],
    splits: list[str],
    address: str | None,
    show: Callable[[dict[int, tuple[str, int, int]]], None] | None = None,
) -> list[dict]:
    """Every seed as a Ray task (``train.num_threads`` CPUs each), in parallel; ``show`` gets
    ``{seed: (role, done, total)}`` about once a second while they run."""
    from training.ray_pool import connect, import_ray

    ray = import_ray()
    owns = connect(address, 1.0)
    try:
        board = ray.remote(num_cpus=0)(ProgressBoard).remote()
        driver_node = ray.get_runtime_context().get_node_id()
        refs = {}
        for plan in plans:
            cpus = max(cfg.train.num_threads for _, cfg, _ in plan.roles)
            task = ray.remote(num_cpus=cpus, max_retries=1)(_remote_seed)
            refs[task.remote(plan, splits, board, driver_node)] = plan
        results = _gather(ray, refs, board, show)
    finally:
        if owns:
            ray.shutdown()
    return [results[p.seed] for p in plans]


def _gather(ray: Any, refs: dict, board: Any, show: Callable | None) -> dict[int, dict]:
    results: dict[int, dict] = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        for ref in ready:
            try:
                result, archive = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the seed's own error, as itself
                raise exc.cause if isinstance(exc.cause, Exception) else exc from None
            plan = refs[ref]
            if archive is not None:  # ran on another node: unpack its run directories here
                unpack(archive, plan.evaluate.parent)
            results[plan.seed] = result
        if show is not None:
            show(ray.get(board.snapshot.remote()))
    return results


class ProgressBoard:
    """A Ray actor the seed tasks report their progress to."""

    def __init__(self) -> None:
        self.state: dict[int, tuple[str, int, int]] = {}

    def report(self, seed: int, role: str, done: int, total: int) -> None:
        self.state[seed] = (role, done, total)

    def snapshot(self) -> dict[int, tuple[str, int, int]]:
        return dict(self.state)


def _remote_seed(
    plan: RunPlan, splits: list[str], board: Any, driver_node: str
) -> tuple[dict, bytes | None]:
    """One seed inside a Ray task; its run directories come back if it ran on another node."""
    import ray

    def report(role: str, done: int, total: int) -> None:
        board.report.remote(plan.seed, role, done, total)

    result = train_and_evaluate(plan, splits, report=report)
    here = ray.get_runtime_context().get_node_id()
    return result, None if here == driver_node else pack(plan.evaluate.parent)


def pack(folder: Path) -> bytes:
    """A gzipped tar of ``folder`` (its name as the root) without replay buffers."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=folder.name,
                filter=lambda t: None if Path(t.name).name in NOT_SENT else t)  # fmt: skip
    return buf.getvalue()


def unpack(archive: bytes, folder: Path) -> None:
    """Replace ``folder`` with the archive's copy of it."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        tar.extractall(folder.parent, filter="data")


# -- the table ------------------------------------------------------------------------------------
def summarize(results: list[dict], splits: list[str]) -> dict[str, Any]:
    """Mean, std, min and max over seeds of every per-episode metric and scalar, per split."""
    table: dict[str, Any] = {}
    for split in splits:
        rows: dict[str, Any] = {}
        reports = [r[split] for r in results]
        for metric in EPISODE_METRICS:
            values = [rep[metric] for rep in reports]
            if any(v is None for v in values):
                continue
            arr = np.asarray(values, dtype=np.float64)  # (seeds, episodes)
            rows[metric] = [_stats(arr[:, e]) for e in range(arr.shape[1])]
        for metric in SCALARS:
            values = [rep[metric] for rep in reports]
            if all(v is not None for v in values):
                rows[metric] = _stats(np.asarray(values, dtype=np.float64))
        table[split] = rows
    walls = [k for k in results[0] if k.endswith("_train_wall_s")]
    table["train_wall_s"] = {k[: -len("_train_wall_s")]: _stats(np.array([r[k] for r in results]))
                             for k in walls}  # fmt: skip
    return table


def _stats(x: np.ndarray) -> dict[str, float]:
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
            "max": float(x.max())}  # fmt: skip


def markdown(summary: dict[str, Any], title: str) -> str:
    """The summary as Markdown tables: one row per metric and episode."""
    lines = [f"### {title}", ""]
    for split, rows in summary["table"].items():
        if split == "train_wall_s":
            continue
        lines += [f"**{split} split**", "", "| metric | episode | mean | std | min | max |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for metric, value in rows.items():
            per_episode = value if isinstance(value, list) else [value]
            for e, s in enumerate(per_episode):
                episode = str(e + 1) if isinstance(value, list) else "-"
                lines.append(f"| {metric} | {episode} | {s['mean']:.3f} | {s['std']:.3f} | "
                             f"{s['min']:.3f} | {s['max']:.3f} |")  # fmt: skip
        lines.append("")
    walls = summary["table"]["train_wall_s"]
    lines.append("training wall time per seed (s): " + ", ".join(
        f"{role} {s['mean']:.1f} (min {s['min']:.1f}, max {s['max']:.1f})"
        for role, s in walls.items()))  # fmt: skip
    lines.append(f"sweep wall time: {summary['wall_s']:.1f} s for {len(summary['seeds'])} seeds"
                 f" ({summary['mode']})")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_summary(out: Path, summary: dict[str, Any], title: str) -> tuple[Path, Path]:
    """``sweep.json`` and ``sweep.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "sweep.json", out / "sweep.md"
    js.write_text(json.dumps(summary, indent=1) + "\n")
    md.write_text(markdown(summary, title))
    return js, md
