"""Experiment tracking with MLflow: job runs and sweep parent runs."""
