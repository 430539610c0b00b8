"""Analyses of a run's results: group overlap against chance (Experiment 1) and drift comparisons with
verdicts (Experiment 2)."""

from .overlap import LEVELS, against_noise_floor, overlap, overlap_markdown
from .stats import ALPHA, MARGIN, PRIMARY, GroupDrift, compare, compare_groups, load_group_drift, verdict

__all__ = ["ALPHA", "LEVELS", "against_noise_floor", "MARGIN", "PRIMARY", "GroupDrift", "compare", "compare_groups", "load_group_drift",
           "overlap", "overlap_markdown", "verdict"]
