"""Experiments as a chain of cached stages.

``run_ablation_experiment`` is what ``make demo`` runs: aligned model -> the model's own safety and utility
sets -> SNIP scores on both -> groups -> ablation sweep. Every stage writes into its own folder of the run
directory; a stage whose output exists (and whose inputs, checked by the stage itself, did not change) is
reused, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .io import BrittleError, manifest, write_json, write_manifest

STAGE_FILE = "stage.json"  # the settings and inputs a stage's outputs were made from


@dataclass(frozen=True)
class AblationExperiment:
    model: str = "smollm2-135m-safe"
    # calibration data: "safety"/"utility" = the model's own built sets; or a source name / .jsonl / .csv
    safety_data: str = "safety"
    utility_data: str = "utility"
    method: str = "snip"
    nsamples: int = 128
    batch_size: int = 4
    max_length: int = 256
    sparsities: tuple[float, ...] = (0.0025, 0.005, 0.01, 0.02)
    p: float | None = None  # None: p = q = sparsity (the paper's diagonal)
    scope: str = "matrix"
    top: float = 0.01
    seed: int = 0
    eval_overrides: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _score_inputs(path: Path) -> dict:
    """What a score file was computed from (its metadata), for the stage records below."""
    from .scoring import read_metadata

    meta = read_metadata(path)
    return {k: meta.get(k) for k in ("method", "model_hash", "dataset_hash", "n_examples", "max_length")}


def _reuse_stage(directory: Path, marker: Path, settings: dict, force: bool) -> bool:
    """True when ``marker`` exists and ``directory/stage.json`` records exactly ``settings``; False when the
    stage must run (nothing there yet, or ``force``). Outputs made from other settings are never reused or
    overwritten silently: that raises, naming the settings that differ."""
    settings = json.loads(json.dumps(settings, default=str))  # as it reads back from stage.json (lists, not tuples)
    if force or not marker.exists():
        return False
    record = directory / STAGE_FILE
    if not record.exists():
        raise BrittleError(f"{directory} has no record of the settings it was made with ({record} is missing: made "
                           f"by an older brittle?); pass --force to recompute it, or choose another --out")
    old = json.loads(record.read_text(encoding="utf-8"))
    if old == settings:
        return True
    diff = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
    raise BrittleError(f"{directory} was made with other settings ({', '.join(diff)}); "
                       f"pass --force to recompute it, or choose another --out")


def run_ablation_experiment(cfg: AblationExperiment, out: str | Path, *, force: bool = False, echo=print) -> dict[str, Path]:
    """Run (or resume) the ablation experiment; returns the paths of its main outputs."""
    from .ablation import ablation_eval_config, run_ablation, sweep_points
    from .data.build import default_build_dir, resolve_dataset
    from .groups import build_groups
    from .models import load_model
    from .scoring import load_scores, score_command

    out = Path(out)
    t0 = time.perf_counter()
    echo(f"[1/5] model {cfg.model}")
    model, tok = load_model(cfg.model)
    data = {"safety": cfg.safety_data, "utility": cfg.utility_data}
    echo("[2/5] safety and utility sets")
    for kind, spec in data.items():
        exs = resolve_dataset(spec, cfg.model, cfg.seed, model_and_tokenizer=(model, tok))
        where = default_build_dir(cfg.model, cfg.seed) if spec == kind else spec
        echo(f"      {kind}: {len(exs)} examples ({where})")
    echo(f"[3/5] {cfg.method} scores on {cfg.nsamples} examples of each set")
    paths = {}
    for kind, spec in data.items():
        paths[kind] = score_command(model=cfg.model, data=spec, method=cfg.method, out=out, nsamples=cfg.nsamples,
                                    seed=cfg.seed, batch_size=cfg.batch_size, max_length=cfg.max_length, force=force,
                                    echo=echo, model_and_tokenizer=(model, tok))
    inputs = {kind: _score_inputs(path) for kind, path in paths.items()}
    echo("[4/5] weight groups")
    p_groups = 0.05 if cfg.p is None else cfg.p
    settings = {"inputs": inputs, "top": cfg.top, "p": p_groups, "q": 0.05, "scope": cfg.scope, "seed": cfg.seed}
    if _reuse_stage(out / "groups", out / "groups" / "set_difference.safetensors", settings, force):
        echo(f"      reusing {out / 'groups'}")
    else:
        build_groups(paths["safety"], paths["utility"], out, top=cfg.top, p=p_groups, q=0.05,
                     scope=cfg.scope, seed=cfg.seed, model=cfg.model, overwrite=True).print()
        write_json(out / "groups" / STAGE_FILE, settings, overwrite=True)
    echo(f"[5/5] ablation sweep over sparsities {', '.join(f'{s:g}' for s in cfg.sparsities)}")
    ab_dir = out / "ablation"
    eval_config = ablation_eval_config(seed=cfg.seed, **cfg.eval_overrides)
    points = sweep_points(cfg.sparsities, cfg.p)
    settings = {"inputs": inputs, "points": points, "scope": cfg.scope, "seed": cfg.seed, "eval": eval_config.to_dict()}
    if _reuse_stage(ab_dir, ab_dir / "ablation.csv", settings, force):
        echo(f"      reusing {ab_dir / 'ablation.csv'}")
    else:
        safety, _ = load_scores(paths["safety"], mmap=False)
        utility, _ = load_scores(paths["utility"], mmap=False)
        run_ablation(model, tok, safety, utility, points, ab_dir, scope=cfg.scope, seed=cfg.seed,
                     eval_config=eval_config, overwrite=True, log=echo)
        write_json(ab_dir / STAGE_FILE, settings, overwrite=True)
    outputs = {"table": ab_dir / "ablation.csv", "markdown": ab_dir / "ablation.md", "figure": ab_dir / "ablation.png",
               "groups": out / "groups", "scores": out / "scores"}
    write_manifest(out, manifest("demo (ablation experiment)", cfg.to_dict(), seeds={"seed": cfg.seed},
                                 outputs={k: str(v) for k, v in outputs.items()} | {"seconds": round(time.perf_counter() - t0, 1)}),
                   overwrite=True)
    echo(f"done in {time.perf_counter() - t0:.0f} s")
    for k, v in outputs.items():
        echo(f"  {k:9s} {v}")
    return outputs
