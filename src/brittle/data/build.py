"""Datasets built from the model itself (how the paper built its safety data from Llama-2-chat).

* safety set  = harmful prompts (training split: never the evaluation prompts) + the model's own greedy
  responses, keeping only those a refusal judge calls refusals;
* utility set = benign instructions (training split) + the model's own greedy responses (empty ones dropped).

Outputs ``safety.jsonl``, ``utility.jsonl`` and ``manifest.json`` (model, weight fingerprint, prompt-source
hashes, generation settings, counts kept/dropped) in the output directory.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..io import BrittleError, cache_dir, manifest, sha256_json, write_manifest
from .core import DataError, Example, load_file, sample, save_jsonl

KINDS = ("safety", "utility")


@dataclass(frozen=True)
class BuildConfig:
    model: str = "smollm2-135m"
    n_safety: int = 256
    n_utility: int = 256
    max_new_tokens: int = 64
    batch_size: int = 16
    judge: str = "refusal-v1"
    seed: int = 0


@dataclass
class BuildResult:
    out_dir: Path
    counts: dict[str, dict[str, int]]

    def summary(self) -> str:
        lines = [f"datasets written to {self.out_dir}"]
        for kind, c in self.counts.items():
            lines.append(f"  {kind:8s} kept {c['kept']:4d} of {c['generated']:4d} generated (dropped {c['dropped']})"
                         f" -> {self.out_dir / (kind + '.jsonl')}")
        s = self.counts["safety"]
        if s["kept"] < max(16, s["generated"] // 4):
            lines.append(f"  note: the model refused only {s['kept']}/{s['generated']} harmful prompts; it is weakly "
                         "aligned, so its safety set is small (an aligned model such as smollm2-135m-safe refuses more)")
        return "\n".join(lines)


def _examples_hash(examples: list[Example]) -> str:
    return sha256_json([e.to_dict() for e in examples])


def build_datasets(cfg: BuildConfig, out_dir: str | Path, *, overwrite: bool = False, progress: bool = True,
                   model_and_tokenizer=None) -> BuildResult:
    """Generate the model's own answers and write the safety and utility sets (see module docstring)."""
    from ..evaluation.generation import GenerationConfig, generate
    from ..evaluation.judges import get_judge
    from ..models import load_model, weight_fingerprint
    from .sources import benign_splits, harmful_splits

    out_dir = Path(out_dir)
    targets = [out_dir / f"{k}.jsonl" for k in KINDS]
    if not overwrite and any(p.exists() for p in targets):
        raise BrittleError(f"{out_dir} already holds built datasets; pass --force to rebuild or choose another --out")
    judge = get_judge(cfg.judge)
    model, tok = model_and_tokenizer or load_model(cfg.model)
    harmful_train, _ = harmful_splits(seed=cfg.seed)
    benign_train, _ = benign_splits(seed=cfg.seed)
    prompts = {"safety": sample(harmful_train, cfg.n_safety, cfg.seed), "utility": sample(benign_train, cfg.n_utility, cfg.seed)}
    gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed)
    counts: dict[str, dict[str, int]] = {}
    written: dict[str, list[Example]] = {}
    for kind in KINDS:
        exs = prompts[kind]
        answers = [a[0] for a in generate(model, tok, [e.prompt for e in exs], gen_cfg, progress=progress, desc=f"{kind} answers")]
        if kind == "safety":
            verdicts = judge([e.prompt for e in exs], answers)
            keep = [v == "refusal" and a.strip() != "" for v, a in zip(verdicts, answers, strict=True)]
        else:
            keep = [a.strip() != "" for a in answers]
        kept = [Example(e.prompt, a, e.source, e.id) for e, a, k in zip(exs, answers, keep, strict=True) if k]
        counts[kind] = {"generated": len(exs), "kept": len(kept), "dropped": len(exs) - len(kept)}
        written[kind] = kept
    for kind in KINDS:
        save_jsonl(out_dir / f"{kind}.jsonl", written[kind], overwrite=overwrite)
    record = manifest(
        "data build",
        {**asdict(cfg), "generation": gen_cfg.to_dict(), "safety_filter": f"keep responses the '{cfg.judge}' judge calls refusals",
         "utility_filter": "drop empty responses"},
        seeds={"seed": cfg.seed},
        inputs={"model_weights": weight_fingerprint(model), "safety_prompts": _examples_hash(prompts["safety"]),
                "utility_prompts": _examples_hash(prompts["utility"])},
        outputs={kind: {"file": f"{kind}.jsonl", **counts[kind], "sha256": _examples_hash(written[kind])} for kind in KINDS},
    )
    write_manifest(out_dir, record, overwrite=overwrite)
    return BuildResult(out_dir, counts)


def default_build_dir(model: str, seed: int = 0) -> Path:
    """Where ``resolve_dataset`` caches the built datasets of ``model``: keyed by the resolved model path
    (presets resolve to content-addressed cache directories), so a rebuilt model gets new datasets."""
    from ..models import resolve_model_path

    resolved = resolve_model_path(model)
    name = Path(resolved).name if Path(resolved).exists() else resolved
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
    return cache_dir() / "data" / key / f"seed{seed}"


def _built_for(path: Path, model_and_tokenizer) -> bool:
    """True if the datasets in ``path`` exist and (when a model is given) were built from its weights."""
    if not (path / "manifest.json").exists():
        return False
    if model_and_tokenizer is None:
        return True
    from ..models import weight_fingerprint

    built = read_build_manifest(path).get("inputs", {}).get("model_weights")
    return built == weight_fingerprint(model_and_tokenizer[0])


def resolve_dataset(spec: str, model: str, seed: int = 0, *, model_and_tokenizer=None) -> list[Example]:
    """``safety`` / ``utility`` -> the model's own built set (built with defaults and cached on first use,
    rebuilt when the cached one was built from other weights); a ``.jsonl``/``.csv`` path -> that file;
    anything else -> a named prompt source (``brittle.data.sources``)."""
    if spec in KINDS:
        d = default_build_dir(model, seed)
        path = d / f"{spec}.jsonl"
        if not _built_for(d, model_and_tokenizer):
            build_datasets(BuildConfig(model=model, seed=seed), d, overwrite=True, model_and_tokenizer=model_and_tokenizer)
        examples = load_file(path, require_response=True) if path.stat().st_size else []
        if not examples:
            raise DataError(f"{path}: the built {spec} set is empty (see {d / 'manifest.json'})")
        return examples
    from .sources import load_examples

    return load_examples(spec)


def read_build_manifest(out_dir: str | Path) -> dict:
    return json.loads((Path(out_dir) / "manifest.json").read_text())
