"""Evaluation: metrics, score fusion, results tables and plots."""
