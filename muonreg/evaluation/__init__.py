"""Evaluation: tracking and regression metrics, resolution tables, plots."""
