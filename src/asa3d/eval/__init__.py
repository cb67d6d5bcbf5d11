"""Evaluation protocol: fine-tuning, linear probing, sweeps, metrics, statistics, plots, report."""
