"""Forward+backward time and peak memory of the weighted-pooling regression task.

Compares muonreg's pooling (weighted average and sum as einsums, no [batch, queries, hits, dim]
tensor) with a naive broadcast implementation of the same ops, at the reference size: batch 200,
2 queries, 600 hits, dim 32: with all four ops (`_all`) and with only the weighted average and
sum (`_weighted`, where the two implementations differ). Each variant runs in a fresh subprocess so its peak resident memory
is its own.

    python bench/pooling_memory.py [--batch 200 --hits 600 --queries 2 --dim 32 --repeats 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch

from muonreg.numerics import masked_max, masked_min
from muonreg.tasks.pooling import POOLING
from muonreg.tasks.weighted_pooling import WeightedPoolingObjectHitRegressionTask

FIELDS = ["truthMuon_eta", "truthMuon_phi", "truthMuon_pt", "truthMuon_q"]


def naive_pool(
    features: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor, op: str
) -> torch.Tensor:
    """The obvious broadcast: a [b, n, m, d] product for the weighted ops."""
    product = weights.unsqueeze(-1) * features.unsqueeze(1)
    if op == "sum":
        return product.sum(2)
    if op == "mean":
        return product.sum(2) / weights.sum(-1, keepdim=True).clamp(min=1e-12)
    return (masked_max if op == "max" else masked_min)(features, selected)


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """Time and memory of the whole task, or (ops=weighted) of the task pooling only mean and sum."""
    torch.manual_seed(0)
    b, n, m, d, f = args.batch, args.queries, args.hits, args.dim, 23
    implementation, ops = variant.split("-")
    task = WeightedPoolingObjectHitRegressionTask(
        d, f, FIELDS, pooling=["mean", "sum"] if ops == "weighted" else list(POOLING)
    )
    if implementation == "naive":
        task.pool = lambda feats, w, sel: [naive_pool(feats, w, sel, op) for op in task.pooling]
    inputs = {
        "query": torch.randn(b, n, d, requires_grad=True),
        "hits": torch.randn(b, m, d, requires_grad=True),
        "hit_x": torch.randn(b, m, f),
        "hit_x_valid": torch.ones(b, m, f, dtype=torch.bool),
        "hit_valid": torch.ones(b, m, dtype=torch.bool),
        "hit_logit": torch.randn(b, n, m, requires_grad=True),
    }
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    task(**inputs)["track_regression"].sum().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(args.repeats):
        task(**inputs)["track_regression"].sum().backward()
    ms = (time.perf_counter() - start) / args.repeats * 1e3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"ms": ms, "peak_rss_mib": peak / 1024, "peak_over_inputs_mib": (peak - base) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--queries", type=int, default=2)
    parser.add_argument("--hits", type=int, default=600)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    print(
        f"# {' '.join(sys.argv)} | {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads | ops {list(POOLING)}"
    )
    for variant in ("ours-all", "naive-all", "ours-weighted", "naive-weighted"):
        out = subprocess.run(
            [sys.executable, *sys.argv, "--variant", variant], capture_output=True, text=True, check=True
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        name = variant.replace("-", "_")
        print(f"pooling_{name}_ms: {result['ms']:.1f}")
        print(f"pooling_{name}_peak_rss_mib: {result['peak_rss_mib']:.0f}")
        print(f"pooling_{name}_peak_over_inputs_mib: {result['peak_over_inputs_mib']:.0f}")


if __name__ == "__main__":
    main()
