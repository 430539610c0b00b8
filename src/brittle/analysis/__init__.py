"""Analyses of a run's results: group overlap against chance (Experiment 1)."""

from .overlap import LEVELS, overlap, overlap_markdown

__all__ = ["LEVELS", "overlap", "overlap_markdown"]
