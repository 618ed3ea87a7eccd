"""Data-loading speed alone: dataset + collate + DataLoader over the benchmark data (events/s).

    python bench/loader_throughput.py --workers N [--events 4000] [--batch 200] [--uncompressed]

The data is simulated once into bench/out at the "high" multiplicity (60-600 hits, mean ~330),
gzip-compressed as the reference preparation writes it (or chunked and uncompressed), and read
with the default feature set (23 inputs with eta) and targets, shuffled and bucketed as in training.
"""

from __future__ import annotations

import sys
import time

from common import arguments, bench_dataset, header

from muonreg.data.dataset import MuonEventDataset, make_loader
from muonreg.data.features import HitFeatures
from muonreg.data.format import DatasetReader
from muonreg.data.schema import HIT_FEATURES

FEATURES = [c for c in HIT_FEATURES if c not in ("spacePoint_readOutSide", "spacePoint_truthLink")]
FEATURES += ["r", "s", "theta", "phi", "eta"]
TARGETS = ["truthMuon_eta", "truthMuon_phi", "truthMuon_pt", "truthMuon_q"]


def main() -> None:
    parser = arguments(__doc__, events=4000)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument(
        "--uncompressed", action="store_true", help="chunked, uncompressed files instead of gzip"
    )
    args = parser.parse_args()
    path = bench_dataset(args.events, compressed=not args.uncompressed, seed=args.seed)
    header(sys.argv)
    reader = DatasetReader(path)
    dataset = MuonEventDataset(reader, HitFeatures(FEATURES, reader.hit_features), TARGETS, max_particles=2)
    loader = make_loader(dataset, args.batch, shuffle=True, num_workers=args.workers, seed=1)
    start = time.perf_counter()
    events = sum(len(batch["event_index"]) for batch in loader)
    rate = events / (time.perf_counter() - start)
    print(f"# {events} events, {'uncompressed' if args.uncompressed else 'gzip'}, batch {args.batch}")
    print(f"loader_events_per_s: {rate:.0f}")


if __name__ == "__main__":
    main()
