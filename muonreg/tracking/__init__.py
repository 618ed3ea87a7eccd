"""Experiment tracking with MLflow: the store and its URI (store), job and sweep parent runs (runs,
sweep), records that reach the store whatever it does (sink, records, replay), and telling a run
whose process died from a live one (liveness)."""
