"""Importance scores (SNIP, Wanda) for every linear weight of the decoder blocks, and score files.

Scores are fp32 tensors in the canonical ``[d_out, d_in]`` orientation of :func:`brittle.models.linear_weight`
(also for GPT-2's ``Conv1D``, whose parameter is stored ``[d_in, d_out]``). The parts:

* :mod:`.methods`: the definitions (loss, ``snip``, ``snip-summed``, ``wanda``), one
  :class:`~.methods.ScoreMethod` object per method, the registry ``METHODS``;
* :mod:`.compute`: the engine, :func:`compute_scores` (how the per-example gradients are computed, memory,
  passes over the data);
* :mod:`.files`: the score file format (safetensors with deterministic metadata).

The ``scores`` stage (:func:`brittle.pipeline.scores_stage`, ``brittle score``) turns a config into these calls.

Everything public is importable from ``brittle.scoring``.
"""

from .compute import CpuCopier, compute_scores, dataset_hash, plan_passes, select_modules
from .files import (
    FORMAT,
    ScoreMismatchError,
    check_scores_match,
    load_scores,
    model_dtypes,
    read_metadata,
    save_scores,
    score_metadata,
)
from .methods import LOSS_DEFINITION, METHODS, WANDA_POSITIONS, BatchInfo, ScoreMethod, get_method

__all__ = [
    "METHODS", "FORMAT", "ScoreMismatchError", "compute_scores", "save_scores", "load_scores", "read_metadata",
    "check_scores_match", "score_metadata", "dataset_hash", "select_modules", "plan_passes",
]
