"""Hydra's `hydra/sweeper=optuna` for muonreg, on today's Optuna (see optuna_sweeper.py)."""
