"""Simulator speed (events/s, one process) and the physics-validation table of the simulated data.

    python bench/simulator_throughput.py [--events 5000] [--seed 0]

Prints `simulator_events_per_s_<multiplicity>: X`, then for the default multiplicity: hits per
muon, noise fraction, mean hits per event, and the technology mix of the true hits per |eta| region.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from common import arguments, header

from muonreg.data.schema import HIT_FEATURES, Technology
from muonreg.data.simulate import MULTIPLICITIES, SimulationConfig, simulate_events

LINK, TECH = HIT_FEATURES.index("spacePoint_truthLink"), HIT_FEATURES.index("spacePoint_technology")


def main() -> None:
    parser = arguments(__doc__, events=5000)
    args = parser.parse_args()
    header(sys.argv)
    samples = {}
    for multiplicity in MULTIPLICITIES:
        simulate_events(200, args.seed, SimulationConfig(multiplicity=multiplicity))  # warm-up
        start = time.perf_counter()
        samples[multiplicity] = simulate_events(
            args.events, args.seed, SimulationConfig(multiplicity=multiplicity)
        )
        rate = args.events / (time.perf_counter() - start)
        print(f"simulator_events_per_s_{multiplicity}: {rate:.0f}")
    for multiplicity, (hits, tracks) in samples.items():
        counts = np.array([len(h) for h in hits])
        rows = np.concatenate(hits)
        n_muons = sum(len(t) for t in tracks)
        print(
            f"{multiplicity}: hits/event mean {counts.mean():.1f} (min {counts.min()}, max {counts.max()}), "
            f"muons/event {n_muons / len(hits):.2f}, true hits/muon {(rows[:, LINK] >= 0).sum() / n_muons:.1f}, "
            f"noise fraction {(rows[:, LINK] < 0).mean():.3f}"
        )
    hits, tracks = samples["default"]
    print("\n| muon abs(eta) | muons | true hits/muon | MDT | RPC | TGC |")
    print("|---|---|---|---|---|---|")
    for lo, hi in ((0.0, 1.05), (1.05, 1.3), (1.3, 1.6), (1.6, 2.0), (2.0, 2.4), (2.4, 2.7)):
        per_muon, tech = [], []
        for h, t in zip(hits, tracks, strict=True):
            for k, track in enumerate(t):
                if lo <= abs(track[1]) < hi:
                    mine = h[h[:, LINK] == k]
                    per_muon.append(len(mine))
                    tech.append(mine[:, TECH])
        tech = np.concatenate(tech)
        mix = [(tech == code).mean() for code in (Technology.MDT, Technology.RPC, Technology.TGC)]
        print(
            f"| {lo}-{hi} | {len(per_muon)} | {np.mean(per_muon):.1f} | "
            + " | ".join(f"{x:.0%}" for x in mix)
            + " |"
        )


if __name__ == "__main__":
    main()
