"""Training: the loop, optimisation, checkpoints, the health guard and data parallelism.

The entry point is `muonreg.training.run.train(cfg)`.
"""
