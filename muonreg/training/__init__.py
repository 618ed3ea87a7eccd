"""Training: the loop, optimisation, checkpoints, the health guard and data parallelism."""

from muonreg.training.run import train

__all__ = ["train"]
