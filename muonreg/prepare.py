"""Prepare datasets for training: `python -m muonreg.prepare default` (also `muonreg-prepare default`).

default     simulate (once) the dataset that `python train.py` uses with the given overrides,
            e.g. `python -m muonreg.prepare default data.simulation.events=50000`; prints its path
root        ATLAS hit-dump ROOT files -> a dataset in the hepattn layout (cuts, no hit limit),
            e.g. `python -m muonreg.prepare root --input ntuples/ --output data/filter --workers 8`
filter      apply a trained hit filter (model=hit_filter) to a high-occupancy dataset, or to simulated
            pile-up events as they are made, and write the tracking dataset (muonreg.filtering):
            `python -m muonreg.prepare filter --checkpoint CKPT --working-point 0.99 --max-hits 600
            --max-tracks 2 (--input DIR | --simulate EVENTS [--pileup 200]) --output DIR`
"""

from __future__ import annotations

import argparse
from pathlib import Path

from muonreg import filtering
from muonreg.data import root_prepare
from muonreg.errors import exit_on_user_errors


def default_dataset(overrides: list[str] | None = None) -> Path:
    """Generate (if needed) the dataset `python train.py [overrides]` trains on; return its path."""
    from hydra import compose, initialize_config_dir

    from muonreg.config import project_root, validate
    from muonreg.training.setup import dataset_path

    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides or [])
    validate(cfg)
    return dataset_path(cfg)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="muonreg-prepare", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    default = commands.add_parser("default", help="simulate the dataset `python train.py` uses")
    default.add_argument("overrides", nargs="*", help="Hydra overrides, as given to train.py")
    root_prepare.add_arguments(commands.add_parser("root", help="ATLAS hit-dump ROOT files -> a dataset"))
    filtering.add_arguments(
        commands.add_parser("filter", help="apply a trained hit filter: high-occupancy -> tracking dataset")
    )
    args = parser.parse_args(argv)
    if args.command == "default":
        print(default_dataset(args.overrides))
    elif args.command == "root":
        print(root_prepare.run(args))
    elif args.command == "filter":
        with exit_on_user_errors():
            print(filtering.run(args))


if __name__ == "__main__":
    main()
