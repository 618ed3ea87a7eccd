"""Forward+backward time and peak memory of the weighted-pooling regression task.

Compares muonreg's pooling (weighted average and sum as einsums, no [batch, queries, hits, dim]
tensor; max and min found without gradient and gathered, so autograd keeps no [b, n, m, d] tensor)
with a naive broadcast implementation of the same ops, at the reference size: batch 200,
2 queries, 600 hits, dim 32. Variants: all four ops (`pooling_ours_*`, `pooling_naive_*`) and only
the weighted average and sum (`*_weighted_*`). Each variant
runs in a fresh subprocess, so its peak resident memory (getrusage ru_maxrss) is its own; rounds
interleave the variants and the median time is reported, which keeps a busy machine's noise out of
the comparison.

    python bench/pooling_memory.py [--batch 200 --hits 600 --queries 2 --dim 32 --repeats 20 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from muonreg.numerics import WEIGHT_FLOOR
from muonreg.tasks.pooling import POOLING
from muonreg.tasks.weighted_pooling import WeightedPoolingObjectHitRegressionTask

FIELDS = ["truthMuon_eta", "truthMuon_phi", "truthMuon_pt", "truthMuon_q"]
INPUT_SIZE = 23  # the reference hit features with eta
VARIANTS = {
    "ours": "ours-all",
    "naive": "naive-all",
    "ours_weighted": "ours-weighted",
    "naive_weighted": "naive-weighted",
}


def naive_pool(
    features: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor, op: str
) -> torch.Tensor:
    """The obvious broadcast, as in the seed: every op reduces a [b, n, m, d] tensor under autograd."""
    if op in ("max", "min"):
        fill = float("-inf") if op == "max" else float("inf")
        masked = features.unsqueeze(1).masked_fill(~selected.unsqueeze(-1), fill)
        extreme = masked.amax(2) if op == "max" else masked.amin(2)
        return torch.where(torch.isinf(extreme), torch.zeros_like(extreme), extreme)  # no hits: 0
    product = weights.unsqueeze(-1) * features.unsqueeze(1)
    if op == "sum":
        return product.sum(2)
    return product.sum(2) / weights.sum(-1, keepdim=True).clamp(min=WEIGHT_FLOOR)


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """Time per step and peak memory of the whole task's forward+backward, in this process."""
    torch.manual_seed(0)
    b, n, m, d = args.batch, args.queries, args.hits, args.dim
    implementation, ops = variant.split("-")
    task = WeightedPoolingObjectHitRegressionTask(
        d, INPUT_SIZE, FIELDS, pooling=["mean", "sum"] if ops == "weighted" else list(POOLING)
    )
    if implementation == "naive":
        task.pool = lambda feats, w, sel: [naive_pool(feats, w, sel, op) for op in task.pooling]
    inputs = {
        "query": torch.randn(b, n, d, requires_grad=True),
        "hits": torch.randn(b, m, d, requires_grad=True),
        "hit_x": torch.randn(b, m, INPUT_SIZE),
        "hit_x_valid": torch.ones(b, m, INPUT_SIZE, dtype=torch.bool),
        "hit_valid": torch.ones(b, m, dtype=torch.bool),
        "hit_logit": torch.randn(b, n, m, requires_grad=True),  # 99 % of hits above threshold 0.1
    }
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    task(**inputs)["track_regression"].sum().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(args.repeats):
        task(**inputs)["track_regression"].sum().backward()
    ms = (time.perf_counter() - start) / args.repeats * 1e3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"ms": ms, "peak_mib": peak / 1024, "peak_over_inputs_mib": (peak - base) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--queries", type=int, default=2)
    parser.add_argument("--hits", type=int, default=600)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per variant; median time")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    print(f"# command: python {' '.join(sys.argv)}")
    print(
        f"# machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; ops {list(POOLING)}"
    )
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, variant in VARIANTS.items():
            cmd = [sys.executable, *sys.argv, "--variant", variant]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for name, runs in results.items():
        print(f"pooling_{name}_ms: {statistics.median(r['ms'] for r in runs):.1f}")
        print(f"pooling_{name}_peak_mib: {max(r['peak_mib'] for r in runs):.0f}")
        print(f"pooling_{name}_peak_over_inputs_mib: {max(r['peak_over_inputs_mib'] for r in runs):.0f}")


if __name__ == "__main__":
    main()
