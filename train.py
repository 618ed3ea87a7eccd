"""Train the muon tracker: `python train.py [-m] key=value ...` (see conf/train.yaml and README.md)."""

import hydra
from omegaconf import DictConfig

import muonreg.config  # noqa: F401  (registers the ${muonreg.root:} resolver before Hydra composes)
from muonreg.training.run import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return train(cfg)


if __name__ == "__main__":
    main()
