"""Resolution and bias of the least-squares MS-standalone fit of the truth hits, in bins of pT and |eta|.

    python bench/fit_resolution.py [--events 8000] [--seed 0] [--workers N]

sigma(pT)/pT as the 68 % core half-width and as RMS (of the central 98 %, so a handful of wild
fits do not hide the shape), the median pT bias, charge mis-identification, eta and phi core
widths. The |eta| bins separate the barrel, the barrel-endcap transition and the endcap.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from common import arguments, header

from muonreg.data.schema import HIT_FEATURES
from muonreg.data.simulate import simulate_events
from muonreg.evaluation.metrics import core_width, wrap_angle
from muonreg.reco.fit import fit_tracks

INDEX = {name: i for i, name in enumerate(HIT_FEATURES)}
PT_BINS = ((5, 10), (10, 20), (20, 50), (50, 100), (100, 200))
ETA_BINS = ((0.0, 1.05), (1.05, 1.3), (1.3, 1.6), (1.6, 2.0), (2.0, 2.7))


def trimmed_rms(x: np.ndarray) -> float:
    lo, hi = np.percentile(x, [1, 99])
    return float(np.sqrt(np.mean(x[(x >= lo) & (x <= hi)] ** 2)))


def table(name: str, value: np.ndarray, bins, fit: dict, truth: np.ndarray) -> None:
    print(
        f"\n| {name} | muons | fit ok | sigma(pT)/pT core | RMS | median bias | q mis-ID | sigma(eta) | sigma(phi) [mrad] |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for lo, hi in bins:
        inside = (value >= lo) & (value < hi)
        s = fit["ok"] & inside
        rel = (fit["pt"][s] - truth[s, 0]) / truth[s, 0]
        print(
            f"| {lo:g}-{hi:g} | {inside.sum()} | {s.sum() / max(inside.sum(), 1):.3f} | {core_width(rel):.3f} "
            f"| {trimmed_rms(rel):.3f} | {np.median(rel):+.3f} | {(fit['q'][s] != truth[s, 3]).mean():.3f} "
            f"| {core_width(fit['eta'][s] - truth[s, 1]):.4f} "
            f"| {core_width(wrap_angle(fit['phi'][s] - truth[s, 2])) * 1e3:.2f} |"
        )


def main() -> None:
    parser = arguments(__doc__, events=8000)
    parser.add_argument("--workers", type=int, help="fitting processes (default: one per core)")
    args = parser.parse_args()
    header(sys.argv)
    hits, tracks = simulate_events(args.events, args.seed)
    link = INDEX["spacePoint_truthLink"]
    muons = [h[h[:, link] == k] for h, t in zip(hits, tracks, strict=True) for k in range(len(t))]
    truth = np.concatenate(tracks)
    start = time.perf_counter()
    fit = fit_tracks(muons, INDEX, workers=args.workers)
    print(f"# {len(muons)} muons")
    print(f"fit_ms_per_track: {(time.perf_counter() - start) / len(muons) * 1e3:.2f}")
    print(f"fit_ok_fraction: {fit['ok'].mean():.4f}")
    table("pT [GeV]", truth[:, 0], PT_BINS, fit, truth)
    table("abs(eta)", np.abs(truth[:, 1]), ETA_BINS, fit, truth)


if __name__ == "__main__":
    main()
