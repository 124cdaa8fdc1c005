"""Thin command-line entry points (no logic of their own)."""
