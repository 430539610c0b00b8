"""Compute and write the groups of a pair of score files (what the ``groups`` stage produces).

:func:`build_groups` writes into one folder: the five standard groups ``<name>.safetensors``, their summary
``summary.csv`` / ``summary.md``, and the groups of every ablation sweep point ``sweep/<label>.safetensors``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..io import sha256_file, write_text
from .files import GroupFileError, save_group
from .select import (
    Group,
    GroupError,
    Scope,
    _check_scores,
    check_fraction,
    check_same_modules,
    check_scope,
    magnitude_matched_random,
    point_label,
    random_like,
    set_difference_of,
    sweep_groups,
    top_k,
)
from .summary import group_summary, print_summary, summary_markdown

GROUP_NAMES = ("top_safety", "top_utility", "set_difference", "random", "random_magnitude")


def read_score_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(scores, metadata)`` of a score file written by ``brittle score`` (read into memory)."""
    from ..scoring import load_scores

    path = Path(path)
    if not path.is_file():
        raise GroupFileError(f"score file not found: {path}")
    scores, meta = load_scores(path, mmap=False)
    if not scores:
        raise GroupFileError(f"score file {path} holds no tensors")
    return scores, meta


def score_model_hash(meta: Mapping[str, Any]) -> str | None:
    """Weight fingerprint of the model a score file was computed on."""
    h = meta.get("model_hash")
    return str(h) if h else None


@dataclass
class GroupsResult:
    """What :func:`build_groups` produced: ``outputs`` is the stage's manifest entry."""

    folder: Path
    outputs: dict[str, Any]
    summary: Any  # pandas.DataFrame from group_summary
    notes: list[str] = field(default_factory=list)

    def print(self, console=None) -> None:
        from rich.console import Console

        console = console or Console()
        print_summary(self.summary, console=console)
        for note in self.notes:
            console.print(note)
        for name in GROUP_NAMES:
            if name in self.outputs:
                console.print(f"{name:18s} {self.folder / self.outputs[name]['file']}")
        console.print(f"{'summary':18s} {self.folder / 'summary.csv'} (and summary.md)")
        if self.outputs.get("sweep"):
            console.print(f"{'sweep groups':18s} {len(self.outputs['sweep'])} in {self.folder / 'sweep'}")


def _check_sources(safety: Path, utility: Path, s_meta: Mapping[str, Any], u_meta: Mapping[str, Any],
                   model_fingerprint: str | None) -> list[str]:
    """Both score files come from one model (and from the model whose weights are used); notes if unknowable."""
    notes: list[str] = []
    hs, hu = score_model_hash(s_meta), score_model_hash(u_meta)
    if hs and hu and hs != hu:
        raise GroupError(
            f"the safety and utility scores come from different models: {safety} was computed on model "
            f"{s_meta.get('model', '?')!r} (weights {hs[:12]}) but {utility} on {u_meta.get('model', '?')!r} "
            f"(weights {hu[:12]}); score both datasets on the same model")
    if s_meta.get("model") and u_meta.get("model") and s_meta["model"] != u_meta["model"] and not (hs and hu):
        notes.append(f"[yellow]note: the score files name different models ({s_meta['model']!r} vs "
                     f"{u_meta['model']!r}) and carry no weight fingerprint to check they are the same[/yellow]")
    if model_fingerprint and hs and model_fingerprint != hs:
        raise GroupError(f"the model given (weights {model_fingerprint[:12]}) is not the model the scores were "
                         f"computed on ({s_meta.get('model', '?')!r}, weights {hs[:12]}); give the scored model "
                         "(--model), or --no-magnitude")
    return notes


def build_groups(safety: str | os.PathLike[str], utility: str | os.PathLike[str], folder: str | os.PathLike[str], *,
                 top: float, p: float, q: float, scope: Scope, seed: int, bins: int, weights: Mapping[str, torch.Tensor] | None = None,
                 model_fingerprint: str | None = None, magnitude: bool = True,
                 sweep: Sequence[tuple[float, float]] = (), sweep_kinds: Sequence[str] = (),
                 score_sha256: tuple[str, str] | None = None) -> GroupsResult:
    """Compute the groups of two score files and write them into ``folder``.

    ``top_safety = top_k(safety, top)``, ``top_utility = top_k(utility, top)``,
    ``set_difference = set_difference(safety, utility, p, q)``, ``random = random_like(set_difference, seed)``
    and ``random_magnitude = magnitude_matched_random(set_difference, weights, seed, bins)`` (with
    ``magnitude``; ``weights`` = the scored model's linear weights ``[d_out, d_in]``, whose fingerprint must
    equal the scores' ``model_hash`` when both are known), all in ``scope``. For every (p, q) in ``sweep``:
    the ``sweep_kinds`` of :func:`sweep_groups` as ``sweep/<label>.safetensors``, each label once, in the order
    the ablation evaluates them. Peak memory: the two score dicts (4 bytes per weight each) + 1 byte per weight
    per group held. The settings have no defaults here: the ``groups`` config section owns them.
    ``score_sha256``: the two score files' sha256 when the caller already has them (else they are computed).
    """
    top, p, q = check_fraction(top, "top"), check_fraction(p, "p"), check_fraction(q, "q")
    check_scope(scope)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise GroupError(f"bins must be a positive integer, got {bins!r}")
    if (magnitude or (sweep and "random_magnitude" in sweep_kinds)) and weights is None:
        raise GroupError("random_magnitude needs the model's weights: give the scored model, or --no-magnitude")
    folder = Path(folder)
    s_scores, s_meta = read_score_file(safety)
    u_scores, u_meta = read_score_file(utility)
    notes = _check_sources(Path(safety), Path(utility), s_meta, u_meta, model_fingerprint)
    _check_scores(s_scores, "safety")
    _check_scores(u_scores, "utility")
    check_same_modules(s_scores, u_scores, (f"safety ({safety})", f"utility ({utility})"))
    if weights is not None:
        check_same_modules(s_scores, weights, ("scores", "model weights"))

    hs, hu = score_sha256 or (sha256_file(safety), sha256_file(utility))
    sources = {"safety": {"path": str(safety), "sha256": hs}, "utility": {"path": str(utility), "sha256": hu}}
    base_meta = {k: str(v) for k, v in (("model", s_meta.get("model")), ("model_hash", score_model_hash(s_meta))) if v}
    outputs: dict[str, Any] = {"sweep": []}
    for p_s, q_s in sweep:
        groups = sweep_groups(s_scores, u_scores, weights if "random_magnitude" in sweep_kinds else None,
                              p_s, q_s, scope, seed, bins, bottom="bottom_safety" in sweep_kinds)
        for kind in sweep_kinds:
            label = point_label(kind, p_s, q_s)
            if any(s["label"] == label for s in outputs["sweep"]):  # top/bottom_safety at a q already there
                continue
            path = folder / "sweep" / f"{label}.safetensors"
            save_group(path, groups[kind], {"definition": kind, "p": str(p_s), "q": str(q_s), "scope": scope,
                                            "seed": str(seed), "sources": sources, **base_meta})
            outputs["sweep"].append({"kind": kind, "p": p_s, "q": q_s, "label": label,
                                     "file": str(path.relative_to(folder)), "sha256": sha256_file(path)})

    groups: dict[str, Group] = {}
    groups["top_safety"] = top_k(s_scores, top, scope, name="top")
    groups["top_utility"] = top_k(u_scores, top, scope, name="top")
    top_q = groups["top_safety"] if q == top else top_k(s_scores, q, scope, name="q")
    top_p = groups["top_utility"] if p == top else top_k(u_scores, p, scope, name="p")
    groups["set_difference"] = set_difference_of(top_q, top_p)
    del top_q, top_p, s_scores, u_scores
    groups["random"] = random_like(groups["set_difference"], seed)
    if magnitude:
        groups["random_magnitude"] = magnitude_matched_random(groups["set_difference"], weights, seed, bins)

    sd_params = {"p": p, "q": q, "scope": scope}
    params = {
        "top_safety": ("top_k", {"fraction": top, "scope": scope, "scores": "safety"}, {"safety": sources["safety"]}),
        "top_utility": ("top_k", {"fraction": top, "scope": scope, "scores": "utility"}, {"utility": sources["utility"]}),
        "set_difference": ("set_difference", sd_params, sources),
        "random": ("random_like", {"like": "set_difference", "seed": seed, **sd_params}, sources),
        "random_magnitude": ("magnitude_matched_random",
                             {"like": "set_difference", "seed": seed, "bins": bins,
                              "weights_fingerprint": model_fingerprint, **sd_params}, sources),
    }
    summary = group_summary(groups)
    total = summary[summary["level"] == "total"].iloc[0]
    for name, group in groups.items():
        definition, prm, src = params[name]
        meta = {"definition": definition, "params": prm, "sources": src, **base_meta,
                "selected": str(int(total[name])), "total": str(int(total["numel"]))}
        path = folder / f"{name}.safetensors"
        save_group(path, group, meta)
        outputs[name] = {"file": path.name, "count": int(total[name]), "fraction": float(total[f"{name}_share"]),
                         "sha256": sha256_file(path)}
    notes.insert(0, f"set_difference selects {int(total['set_difference']):,} of {int(total['numel']):,} weights "
                    f"= {100 * float(total['set_difference_share']):.4f}% (q = {100 * q:g}%, p = {100 * p:g}%, "
                    f"scope {scope})")
    write_text(folder / "summary.csv", summary.to_csv(index=False))
    write_text(folder / "summary.md", f"# Weight groups\n\n{notes[0]}\n\n" + summary_markdown(summary))
    outputs["summary"] = {"file": "summary.csv", "sha256": sha256_file(folder / "summary.csv")}
    return GroupsResult(folder=folder, outputs=outputs, summary=summary, notes=notes)
