"""Scoring models on lm-eval tasks."""
