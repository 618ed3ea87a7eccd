"""Peak memory and time of the hit filter at high occupancy: events of 1000-5000 hits.

For each hit count, a fresh subprocess builds the filter of `model=hit_filter` (dim 32, 3 layers,
4 heads, windows of 128 hits sorted by phi) and runs, on a batch of synthetic events, training steps
(forward, backward, optimiser step) and inference (forward without gradient). It reports the median
step time, events/s, and the peak resident memory (getrusage ru_maxrss) above the process's memory
before the first step, so each number is that setting's own. `--full` adds the same filter with full
attention over all hits (window null) for comparison: its memory grows with the square of the hits.

    python bench/hit_filter_memory.py [--hits 1000 2000 3000 4000 5000 --batch 8 --repeats 3 --full]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from muonreg.models import HitFilter

INPUT_SIZE = 23  # the reference hit features with eta
SORT_INDEX = 21  # phi among them


def synthetic_batch(batch: int, hits: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random standardised-looking hit features, 3 % of the hits on a muon, no padding."""
    g = torch.Generator().manual_seed(seed)
    muon = torch.rand(batch, hits, generator=g) < 0.03
    return {
        "hit_x": torch.randn(batch, hits, INPUT_SIZE, generator=g),
        "hit_x_valid": torch.ones(batch, hits, INPUT_SIZE, dtype=torch.bool),
        "hit_valid": torch.ones(batch, hits, dtype=torch.bool),
        "particle_hit_valid": torch.stack([muon, torch.zeros_like(muon)], dim=1),
    }


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(hits: int, batch: int, repeats: int, window: int | None, mode: str) -> dict:
    """One setting, in this process: median seconds per step and the peak memory it added."""
    torch.manual_seed(0)
    model = HitFilter(INPUT_SIZE, sort_index=SORT_INDEX, window=window)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = synthetic_batch(batch, hits)
    before = peak_mib()
    times = []
    for _ in range(repeats + 1):  # the first step warms up
        start = time.perf_counter()
        if mode == "train":
            model.train()
            loss = model.loss(model(data), data)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        else:
            model.eval()
            with torch.no_grad():
                model(data)
        times.append(time.perf_counter() - start)
    step = statistics.median(times[1:])
    return {
        "mode": mode,
        "attention": "full" if window is None else f"window {window}",
        "hits": hits,
        "batch": batch,
        "s_per_step": step,
        "events_per_s": batch / step,
        "peak_rss_mib": peak_mib(),
        "added_mib": peak_mib() - before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hits", type=int, nargs="+", default=[1000, 2000, 3000, 4000, 5000])
    parser.add_argument("--batch", type=int, default=8, help="events per step (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--full", action="store_true", help="also full attention (window null)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting, print JSON
    args = parser.parse_args()
    if args.one:
        hits, mode, window = args.one.split(",")
        result = measure(int(hits), args.batch, args.repeats, None if window == "full" else int(window), mode)
        print(json.dumps(result))
        return
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    print(
        "| mode | attention | hits/event | batch | s/step | events/s | peak RSS MiB | added by the steps MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    windows = [str(args.window), *(["full"] if args.full else [])]
    for window in windows:
        for mode in ("train", "infer"):
            for hits in args.hits:
                one = f"{hits},{mode},{window}"
                cmd = [sys.executable, __file__, "--one", one, "--batch", str(args.batch)]
                out = subprocess.run([*cmd, "--repeats", str(args.repeats)], capture_output=True, text=True)
                if out.returncode != 0:
                    print(
                        f"| {mode} | {window} | {hits} | {args.batch} | failed: {out.stderr.strip()[-200:]} |"
                    )
                    continue
                r = json.loads(out.stdout)
                print(
                    f"| {r['mode']} | {r['attention']} | {r['hits']} | {r['batch']} | {r['s_per_step']:.2f} | "
                    f"{r['events_per_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['added_mib']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
