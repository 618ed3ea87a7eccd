"""`muonreg-simulate`: simulated events as a dataset in the hepattn layout, or as ATLAS ROOT files.

    muonreg-simulate --events N --out DIR [...]                  HDF5 dataset (= python -m muonreg.data.simulate)
    muonreg-simulate --format root --events N --out DIR [--files K] [--seed S] [--pileup MU]

The HDF5 path is `simulate.main`, untouched: the simulator's code keys the cached default dataset
(`muonreg/versions.py`), so the ROOT output (`simulate_root`) is chosen here, in front of it.
"""

from __future__ import annotations

import argparse

from muonreg.data import simulate, simulate_root

FORMATS = ("hdf5", "root")


def main(argv: list[str] | None = None) -> None:
    front = argparse.ArgumentParser(prog="muonreg-simulate", add_help=False)
    front.add_argument("--format", choices=FORMATS, default="hdf5")
    known, rest = front.parse_known_args(argv)
    if known.format == "hdf5":
        if any(arg.startswith("--pileup") for arg in rest):
            front.error("--pileup needs --format root (pile-up events exceed the HDF5 set's 600-hit limit)")
        if "-h" in rest or "--help" in rest:
            print(
                "--format root: ATLAS hit-dump ROOT files with pile-up (muonreg-simulate --format root --help)\n"
            )
        simulate.main(rest)
        return
    parser = argparse.ArgumentParser(
        prog="muonreg-simulate --format root",
        description="Simulate muon events into ATLAS hit-dump ROOT files (MuonHitDump trees), the input "
        "of `muonreg-prepare root`.",
    )
    simulate_root.add_arguments(parser)
    args = parser.parse_args(rest)
    if args.out.exists():
        parser.error(f"{args.out} already exists; remove it or choose another --out")
    print(simulate_root.write_simulated_root(args.out, args.events, args.seed, args.files, args.pileup))


if __name__ == "__main__":
    main()
