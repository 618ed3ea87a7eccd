"""Resolution of the least-squares MS-standalone fit of the truth hits, in bins of pT.

    python bench/fit_resolution.py [--events 4000] [--seed 0]

sigma(pT)/pT as the 68 % core half-width and as RMS (of the central 98 %, so a handful of
wild fits do not hide the shape), charge mis-identification, eta and phi core widths.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from common import arguments, header

from muonreg.data.fit import fit_tracks
from muonreg.data.schema import HIT_FEATURES
from muonreg.data.simulate import simulate_events
from muonreg.evaluation.metrics import core_width, wrap_angle

INDEX = {name: i for i, name in enumerate(HIT_FEATURES)}
BINS = ((5, 10), (10, 20), (20, 50), (50, 100), (100, 200))


def trimmed_rms(x: np.ndarray) -> float:
    lo, hi = np.percentile(x, [1, 99])
    return float(np.sqrt(np.mean(x[(x >= lo) & (x <= hi)] ** 2)))


def main() -> None:
    parser = arguments(__doc__, events=4000)
    args = parser.parse_args()
    header(sys.argv)
    hits, tracks = simulate_events(args.events, args.seed)
    link = INDEX["spacePoint_truthLink"]
    muons = [h[h[:, link] == k] for h, t in zip(hits, tracks, strict=True) for k in range(len(t))]
    truth = np.concatenate(tracks)
    start = time.perf_counter()
    fit = fit_tracks(muons, INDEX)
    print(f"fit_ms_per_track: {(time.perf_counter() - start) / len(muons) * 1e3:.1f}")
    print(f"fit_ok_fraction: {fit['ok'].mean():.4f}")
    print("\n| pT [GeV] | muons | sigma(pT)/pT core | RMS | q mis-ID | sigma(eta) | sigma(phi) [mrad] |")
    print("|---|---|---|---|---|---|---|")
    for lo, hi in BINS:
        s = fit["ok"] & (truth[:, 0] >= lo) & (truth[:, 0] < hi)
        rel = (fit["pt"][s] - truth[s, 0]) / truth[s, 0]
        print(
            f"| {lo}-{hi} | {s.sum()} | {core_width(rel):.3f} | {trimmed_rms(rel):.3f} "
            f"| {(fit['q'][s] != truth[s, 3]).mean():.3f} | {core_width(fit['eta'][s] - truth[s, 1]):.4f} "
            f"| {core_width(wrap_angle(fit['phi'][s] - truth[s, 2])) * 1e3:.2f} |"
        )


if __name__ == "__main__":
    main()
