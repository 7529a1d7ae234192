"""CLI subcommands of the runtime: ``bench runtime``, ``bench belief``, ``bench adapt``,
``selftest`` and
``trt-build`` (argparse only at import; numpy/onnxruntime when a handler runs)."""

from __future__ import annotations

import argparse
import json

from runtime.plugins import add_plugin_arg


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("runtime", help="step latency, torch ratio, cold start, RSS, throughput")
    add_plugin_arg(p)
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--profile", help="device profile whose budgets the numbers are checked against")
    p.add_argument("--pubkey", help="verify the bundle signature with this key")
    p.add_argument("--steps", type=int, default=20_000, help="timed single-agent steps")
    p.add_argument("--cold-runs", type=int, default=3, help="fresh processes for cold start")
    p.add_argument(
        "--run", help="run directory: torch comparison on the run's own step module (any family)"
    )
    p.set_defaults(handler=cmd_bench_runtime)

    p = bench.add_parser("belief", help="O(1) belief update vs naive recompute, 10..100k context")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--max-context", type=int, default=100_000, help="largest context length")
    p.set_defaults(handler=cmd_bench_belief)

    p = bench.add_parser(
        "adapt",
        help="time of a bundle's episodic adaptation (MAML's inner step) in its adapt graph",
    )
    p.add_argument("bundle", help="bundle directory (one with an episodic adaptation)")
    p.add_argument("--runs", type=int, default=300, help="timed adaptations")
    p.add_argument("--seed", type=int, default=0, help="task and exploration-noise seed")
    p.add_argument("--pubkey", help="verify the bundle signature with this key")
    p.set_defaults(handler=cmd_bench_adapt)

    p = sub.add_parser("selftest", help="run a bundle's test vectors and time steps on this device")
    add_plugin_arg(p)
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--pubkey", help="Ed25519 public key (PEM); a signature is then required")
    p.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_selftest)

    p = sub.add_parser("trt-build", help="build and cache the TensorRT engine of a bundle's graph")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--cache-dir", required=True, help="engine cache directory on the device")
    p.add_argument("--graph", default="step", help="graph name in the manifest")
    p.set_defaults(handler=cmd_trt_build)


def cmd_bench_adapt(args: argparse.Namespace) -> int:
    from runtime.adapt_bench import bench_adapt

    print(json.dumps(bench_adapt(args.bundle, args.runs, args.pubkey, args.seed), indent=2))
    return 0


def cmd_bench_runtime(args: argparse.Namespace) -> int:
    from runtime.bench import bench_runtime

    res = bench_runtime(
        args.bundle, args.steps, args.pubkey, args.profile, args.cold_runs, run_dir=args.run
    )
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    torch_us = res["torch_eager_us_median"]
    print(
        f"step (act+observe): median {res['step_us_median']:.1f} µs, p99 {res['step_us_p99']:.1f}"
    )
    if torch_us is not None:
        print(f"torch eager: {torch_us:.1f} µs ({res['speedup_vs_torch']:.1f}x slower)")
    print(f"cold start {res['cold_start_s']:.3f} s, peak RSS {res['rss_mb']:.0f} MB")
    for b, row in res["batched"].items():
        print(f"batch {b}: {row['agent_steps_per_s']:.0f} agent-steps/s")
    for name, us in res["tuning"].items():
        print(f"  {name}: {us:.1f} µs")
    return 0


def cmd_bench_belief(args: argparse.Namespace) -> int:
    from runtime.bench import CONTEXT_LENGTHS, belief_scaling

    lengths = tuple(t for t in CONTEXT_LENGTHS if t <= args.max_context)
    res = belief_scaling(args.bundle, lengths)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{'context':>8}  {'O(1) µs':>9}  {'naive µs':>10}")
    for row in res["rows"]:
        print(f"{row['context']:>8}  {row['o1_step_us']:>9.1f}  {row['naive_step_us']:>10.1f}")
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from runtime.agent import Agent, AgentConfig
    from runtime.bundle import load_verified
    from runtime.errors import BundleError
    from runtime.graphio import graph_io_problems

    manifest = load_verified(args.bundle, args.pubkey, args.pubkey is not None)
    io_problems = graph_io_problems(args.bundle, manifest)
    if io_problems:
        raise BundleError(f"{args.bundle}: refused: " + "; ".join(io_problems))
    agent = Agent.load(
        args.bundle,
        pubkey=args.pubkey,
        require_signature=args.pubkey is not None,
        config=AgentConfig(precision=args.precision),
    )
    rep = agent.self_test()
    out = {
        "passed": rep.passed,
        "max_abs_err": rep.max_abs_err,
        "step_us_median": rep.step_us_median,
        "providers": agent.providers,
        "reasons": rep.reasons,
    }
    print(json.dumps(out, indent=2) if args.json else _human(out))
    return 0 if rep.passed else 1


def cmd_trt_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from runtime.bundle import load_verified
    from runtime.trt import TrtBuildSettings, build_engine

    manifest = load_verified(args.bundle)
    spec = manifest.graph(args.graph)
    settings = TrtBuildSettings.from_manifest(manifest.trt)
    path = build_engine(Path(args.bundle) / spec.file, args.cache_dir, settings)
    print(f"engine: {path}")
    return 0


def _human(out: dict) -> str:
    verdict = "PASSED" if out["passed"] else "FAILED: " + "; ".join(out["reasons"])
    return (
        f"self-test {verdict}\nmax error {out['max_abs_err']:.3g}, "
        f"step median {out['step_us_median']:.1f} µs on {', '.join(out['providers'])}"
    )
