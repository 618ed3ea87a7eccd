"""`muonreg-simulate`: simulated events as a dataset in the hepattn layout, or as ATLAS ROOT files.

    muonreg-simulate --events N --out DIR [...]                  HDF5 tracking dataset (= python -m muonreg.data.simulate)
    muonreg-simulate --pileup MU --events N --out DIR [...]      HDF5 filter dataset at pile-up MU (no hit limit)
    muonreg-simulate --format root --events N --out DIR [--files K] [--seed S] [--pileup MU] [--rntuple]

The HDF5 tracking path is `simulate.main`, untouched: the simulator's code keys the cached default
dataset (`muonreg/versions.py`), so the pile-up paths (`pileup`, `simulate_root`) are chosen here,
in front of it. The filter dataset holds the events the ROOT files prepared by `muonreg-prepare
root` hold, made in one step.
"""

from __future__ import annotations

import argparse

from muonreg.data import pileup, simulate, simulate_root

FORMATS = ("hdf5", "root")


def main(argv: list[str] | None = None) -> None:
    front = argparse.ArgumentParser(prog="muonreg-simulate", add_help=False)
    front.add_argument("--format", choices=FORMATS, default="hdf5")
    front.add_argument("--pileup", type=float, default=None)
    known, rest = front.parse_known_args(argv)
    if known.format == "hdf5" and known.pileup is None:
        if "-h" in rest or "--help" in rest:
            print(
                "--pileup MU: an HDF5 filter dataset at pile-up MU; --format root: ATLAS hit-dump ROOT files "
                "(muonreg-simulate --pileup 200 --help, muonreg-simulate --format root --help)\n"
            )
        simulate.main(rest)
        return
    root = known.format == "root"
    parser = argparse.ArgumentParser(
        prog=f"muonreg-simulate {'--format root' if root else '--pileup MU'}",
        description="Simulate muon events into ATLAS hit-dump ROOT files (MuonHitDump trees), the input of "
        "`muonreg-prepare root`."
        if root
        else "Simulate muon events with pile-up into a filter dataset (hepattn layout, no hit limit), as "
        "`muonreg-prepare root` makes of ROOT hit dumps.",
    )
    simulate_root.add_arguments(parser)
    if root:
        simulate_root.add_root_arguments(parser)
    else:
        parser.add_argument("--uncompressed", action="store_true", help="write chunked, uncompressed files")
    args = parser.parse_args(rest + ([] if known.pileup is None else ["--pileup", str(known.pileup)]))
    if args.out.exists():
        parser.error(f"{args.out} already exists; remove it or choose another --out")
    if args.pileup < 0:
        parser.error(f"--pileup {args.pileup:g}: the mean pile-up must be >= 0")
    if root:
        print(
            simulate_root.write_simulated_root(
                args.out, args.events, args.seed, args.files, args.pileup, rntuple=args.rntuple
            )
        )
        return
    compression = None if args.uncompressed else "gzip"
    print(
        pileup.write_pileup_dataset(
            args.out, args.events, args.seed, args.files, args.pileup, compression=compression
        )
    )


if __name__ == "__main__":
    main()
