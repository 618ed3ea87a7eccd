"""Train the muon tracker: `python train.py [-m] key=value ...` (see conf/train.yaml and README.md)."""

import hydra
from omegaconf import DictConfig

import muonreg.config  # noqa: F401  (registers the ${muonreg.root:} resolver before Hydra composes)
from muonreg.errors import hydra_user_errors
from muonreg.training.run import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    with hydra_user_errors():  # a config, data or tracking-store mistake: one line, no traceback
        return train(cfg)


if __name__ == "__main__":
    main()
