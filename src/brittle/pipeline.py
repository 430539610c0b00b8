"""Experiments as a chain of cached stages.

``run_ablation_experiment`` is what ``make demo`` runs: aligned model -> the model's own safety and utility
sets -> SNIP scores on both -> groups -> ablation sweep. Every stage writes into its own folder of the run
directory; a stage whose output exists (and whose inputs, checked by the stage itself, did not change) is
reused, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .io import manifest, write_manifest


@dataclass(frozen=True)
class AblationExperiment:
    model: str = "smollm2-135m-safe"
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
    echo("[2/5] safety and utility sets from the model's own answers")
    for kind in ("safety", "utility"):
        exs = resolve_dataset(kind, cfg.model, cfg.seed, model_and_tokenizer=(model, tok))
        echo(f"      {kind}: {len(exs)} examples ({default_build_dir(cfg.model, cfg.seed)})")
    echo(f"[3/5] {cfg.method} scores on {cfg.nsamples} examples of each set")
    paths = {}
    for kind in ("safety", "utility"):
        paths[kind] = score_command(model=cfg.model, data=kind, method=cfg.method, out=out, nsamples=cfg.nsamples,
                                    seed=cfg.seed, batch_size=cfg.batch_size, max_length=cfg.max_length, force=force,
                                    echo=echo, model_and_tokenizer=(model, tok))
    echo("[4/5] weight groups")
    if force or not (out / "groups" / "set_difference.safetensors").exists():
        build_groups(paths["safety"], paths["utility"], out, top=cfg.top, p=0.05 if cfg.p is None else cfg.p, q=0.05,
                     scope=cfg.scope, seed=cfg.seed, model=cfg.model, overwrite=True).print()
    else:
        echo(f"      reusing {out / 'groups'}")
    echo(f"[5/5] ablation sweep over sparsities {', '.join(f'{s:g}' for s in cfg.sparsities)}")
    safety, _ = load_scores(paths["safety"], mmap=False)
    utility, _ = load_scores(paths["utility"], mmap=False)
    ab_dir = out / "ablation"
    if force or not (ab_dir / "ablation.csv").exists():
        run_ablation(model, tok, safety, utility, sweep_points(cfg.sparsities, cfg.p), ab_dir, scope=cfg.scope, seed=cfg.seed,
                     eval_config=ablation_eval_config(seed=cfg.seed, **cfg.eval_overrides), overwrite=True, log=echo)
    else:
        echo(f"      reusing {ab_dir / 'ablation.csv'}")
    outputs = {"table": ab_dir / "ablation.csv", "markdown": ab_dir / "ablation.md", "figure": ab_dir / "ablation.png",
               "groups": out / "groups", "scores": out / "scores"}
    write_manifest(out, manifest("demo (ablation experiment)", cfg.to_dict(), seeds={"seed": cfg.seed},
                                 outputs={k: str(v) for k, v in outputs.items()} | {"seconds": round(time.perf_counter() - t0, 1)}),
                   overwrite=True)
    echo(f"done in {time.perf_counter() - t0:.0f} s")
    for k, v in outputs.items():
        echo(f"  {k:9s} {v}")
    return outputs
