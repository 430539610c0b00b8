"""Weight groups: top-k selections, the safety/utility set difference, random controls, group files.

A *group* is a ``dict[str, torch.BoolTensor]``: for every canonical module name (``layers.3.q``) a
boolean mask shaped like that module's weight ``[d_out, d_in]``; ``True`` = the weight entry W[row, col]
belongs to the group. Score dicts have the same keys and shapes (larger = more important).

* :mod:`~brittle.groups.select` -- the selection math (sizes, scopes, ties, set difference, random controls);
* :mod:`~brittle.groups.files` -- the group file format (:func:`save_group` / :func:`load_group`);
* :mod:`~brittle.groups.summary` -- counts and shares per module, layer, type (DataFrame, Markdown, console);
* :mod:`~brittle.groups.build` -- the groups of two score files written to a folder (:func:`build_groups`),
  what the ``groups`` stage (:func:`brittle.pipeline.groups_stage`) produces.
"""

from __future__ import annotations

from .files import GROUP_FORMAT, GroupFileError, load_group, save_group
from .select import (
    Q_ONLY_KINDS,
    SCOPES,
    Group,
    GroupError,
    Scope,
    bottom_k,
    check_fraction,
    check_same_modules,
    check_scope,
    magnitude_bin_ids,
    magnitude_matched_random,
    module_seed,
    module_sort_key,
    point_label,
    random_like,
    selection_size,
    set_difference,
    set_difference_of,
    sweep_groups,
    top_k,
)
from .build import GROUP_NAMES, GroupsResult, build_groups, read_score_file, score_model_hash
from .summary import group_summary, print_summary, summary_markdown

__all__ = [
    "SCOPES", "GROUP_NAMES", "GROUP_FORMAT", "GroupError", "GroupFileError", "check_fraction", "check_scope",
    "selection_size", "module_sort_key", "check_same_modules", "top_k", "bottom_k", "set_difference", "set_difference_of",
    "module_seed", "random_like", "magnitude_bin_ids", "magnitude_matched_random", "save_group", "load_group",
    "group_summary", "summary_markdown", "print_summary", "read_score_file", "score_model_hash",
    "GroupsResult", "build_groups", "sweep_groups", "point_label", "Q_ONLY_KINDS",
]
