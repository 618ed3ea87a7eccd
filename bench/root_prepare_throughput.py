"""ROOT -> HDF5 preparation speed on simulated HL-LHC (pile-up) hit dumps, with 1 and 2 workers.

    python bench/root_prepare_throughput.py [--events 400] [--files 4] [--pileup 200] [--seed 0]

Simulates the ROOT files once (`muonreg-simulate --format root`, cached under bench/out), then runs
`python -m muonreg.prepare root` on them, as a user does (interpreter start included), with 1 and
with 2 worker processes (one file per task), writing gzip files (the default, as the reference) and
uncompressed ones (`--uncompressed`). Prints `root_prepare_events_per_s_<N>workers_<compression>: X`,
the hits per second behind it, and the load average (other jobs on the CPU) before each run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from common import OUT, arguments, header

from muonreg.data.format import DatasetReader
from muonreg.data.simulate_root import write_simulated_root


def main() -> None:
    parser = arguments(__doc__, events=400)
    parser.add_argument("--files", type=int, default=4, help="ROOT files (default: %(default)s)")
    parser.add_argument("--pileup", type=float, default=200.0, help="pile-up <mu> (default: %(default)s)")
    args = parser.parse_args()
    header(sys.argv)
    source = OUT / f"root-pu{args.pileup:g}-{args.events}-{args.files}files-s{args.seed}"
    if not source.is_dir():
        start = time.perf_counter()
        write_simulated_root(source, args.events, args.seed, args.files, args.pileup, progress=False)
        print(f"simulate_root_events_per_s: {args.events / (time.perf_counter() - start):.0f}")
    for workers, compression in ((1, "gzip"), (2, "gzip"), (1, "uncompressed"), (2, "uncompressed")):
        out = OUT / f"{source.name}-prepared-{workers}w"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "muonreg.prepare", "root", f"--input={source}", f"--output={out}"]
        command += [f"--workers={workers}"] + (["--uncompressed"] if compression == "uncompressed" else [])
        load = os.getloadavg()[0]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        reader = DatasetReader(out)
        hits = int(reader.num_hits().sum())
        print(
            f"root_prepare_events_per_s_{workers}workers_{compression}: {len(reader) / seconds:.0f} "
            f"({hits / seconds / 1e6:.2f} M hits/s, {hits / len(reader):.0f} hits/event, {seconds:.1f} s, "
            f"load average {load:.1f})"
        )
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
