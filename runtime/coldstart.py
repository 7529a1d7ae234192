"""Child process of ``bench runtime``: time to first action and peak memory of a fresh runtime.

``python -m runtime.coldstart BUNDLE`` imports only the runtime (numpy + onnxruntime), loads
and verifies the bundle, takes one action, then runs 2000 more steps and prints one JSON line
with the wall-clock time of the first action (the parent subtracts its spawn time) and the
peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    t_start = time.time()
    parser = argparse.ArgumentParser(prog="python -m runtime.coldstart")
    parser.add_argument("bundle")
    parser.add_argument("--pubkey")
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args(argv)
    import numpy as np

    from runtime.agent import Agent

    t_imported = time.time()
    agent = Agent.load(args.bundle, pubkey=args.pubkey, require_signature=bool(args.pubkey))
    t_loaded = time.time()
    obs = np.zeros(agent.manifest.obs.dim, dtype=np.float32)
    action = agent.act(obs)
    t_first = time.time()
    for _ in range(args.steps):
        nxt = (obs + 0.01 * action[: obs.size].sum()).astype(np.float32)
        agent.observe(obs, action, -1.0, nxt)
        obs = nxt
        action = agent.act(obs)
    rss_mb = peak_rss_mb()
    result = {
        "first_action_at": t_first,
        "rss_mb": rss_mb,
        "torch_loaded": "torch" in sys.modules,
        "breakdown_s": {
            "imports": t_imported - t_start,
            "verify_load_warmup": t_loaded - t_imported,
            "first_action": t_first - t_loaded,
        },
    }
    print(json.dumps(result))
    return 0


def peak_rss_mb() -> float:
    """Peak resident memory (MB) of this process image: ``VmHWM`` from /proc (ru_maxrss would
    include the parent's footprint, which Linux carries across fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


if __name__ == "__main__":
    sys.exit(main())
