"""Train the muon tracker: `python train.py [-m] key=value ...` (see conf/train.yaml and README.md)."""

import sys

import hydra
from omegaconf import DictConfig

import muonreg.config  # noqa: F401  (registers the ${muonreg.*:} resolvers before Hydra composes)
from muonreg.errors import hydra_user_errors
from muonreg.training import distributed
from muonreg.training.interrupts import exit_on_stop
from muonreg.training.run import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    with hydra_user_errors():  # a config, data or tracking-store mistake: one line, no traceback
        return train(cfg)


if __name__ == "__main__":
    # Under torchrun or SLURM tasks every rank runs this file: they share one output directory,
    # and rank 0 alone writes its .hydra/ record.
    if not distributed.share_launch_time().is_main:
        sys.argv.append("hydra.output_subdir=null")
    with exit_on_stop():  # a stop signal or Ctrl-C: one line, the signal's exit status
        main()
