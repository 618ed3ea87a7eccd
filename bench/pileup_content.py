"""What a simulated pile-up event holds, per technology and station: hits per event and the share of
them on a muon, beside the reference's totals (hepattn_muon EVALUATION_SUMMARY.md: 100 PU200 events of
ATLAS simulation, 725 835 hits, 0.7 % on a muon; evaluation_results_final: 1000 events, 0.8 %).

    python bench/pileup_content.py [--events 200] [--pileup 200]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from common import header
from hit_filter_speed import pileup_events

from muonreg.data.format import DatasetReader
from muonreg.data.schema import Technology

STATIONS = {0: "BI", 1: "BM", 2: "BO", 4: "EI", 5: "EM", 6: "EO", 7: "EE"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--pileup", type=float, default=200.0)
    args = parser.parse_args()
    header(sys.argv)
    reader = DatasetReader(pileup_events(args.events, args.pileup))
    events = [reader.read(i) for i in range(len(reader))]
    hits = np.concatenate([e.hits for e in events])
    muons = np.mean([len(e.tracks) for e in events])
    col = reader.hit_index
    tech = hits[:, col["spacePoint_technology"]].astype(int)
    station = hits[:, col["spacePoint_stationIndex"]].astype(int)
    muon = hits[:, col["spacePoint_truthLink"]] >= 0
    n = len(reader)
    print(f"{n} events at pile-up {args.pileup:g}: {len(hits) / n:.0f} hits per event, {muon.mean():.2%} on a muon, "
          f"{muon.sum() / n:.1f} muon hits and {muons:.2f} muons per event")  # fmt: skip
    print("| technology | station | hits / event | muon hits / event | muon share |")
    print("|---|---|---|---|---|")
    for t in np.unique(tech):
        for s in np.unique(station[tech == t]):
            sel = (tech == t) & (station == s)
            print(f"| {Technology(t).name} | {STATIONS.get(s, s) if t == Technology.MDT else s} | {sel.sum() / n:.0f} | "
                  f"{muon[sel].sum() / n:.2f} | {muon[sel].mean():.2%} |")  # fmt: skip


if __name__ == "__main__":
    main()
