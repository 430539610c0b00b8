"""Load a chat model from a local directory / GGUF file / Hub id; list its linear modules (presets: :mod:`brittle.presets`).

Canonical module names are ``layers.{i}.{role}``: ``i`` is the decoder block index and ``role`` the
module's job in the block (``q k v o gate up down`` for Llama-like models, ``qkv o gate_up down`` for
Phi-3, ``qkv o up down`` for GPT-2). The same names are used for scores, groups, drift and reports, and
they are the same whether or not the model is wrapped by PEFT.

Weight orientation: brittle always works with weights as ``[d_out, d_in]`` (rows = output units, the
``nn.Linear`` layout). GPT-2's ``Conv1D`` stores ``[d_in, d_out]``; :func:`linear_weight` returns its
transpose as a *view*, so in-place edits (ablation) reach the real parameter and scores computed on the
view come out in the canonical ``[d_out, d_in]`` orientation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .io import BrittleError, cache_dir, sha256_file

# --------------------------------------------------------------------------------------------------
# Resolution and loading


class UnknownModelError(BrittleError):
    """A model spec that is no directory, ``.gguf`` file or Hub id (the preset layer adds its names)."""


def gguf_to_hf_dir(gguf_path: str | os.PathLike[str]) -> Path:
    """Dequantise a GGUF once into fp32 safetensors under ``$BRITTLE_CACHE/models``; return that directory.

    The cache key is the GGUF's sha256, so a changed file gets a new directory. A corrupt GGUF fails to
    parse and is reported with its path.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise BrittleError(f"GGUF file not found: {gguf_path}")
    digest = sha256_file(gguf_path)
    target = cache_dir() / "models" / f"{gguf_path.stem}-{digest[:16]}"
    if (target / "brittle_source.json").exists():
        return target
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as e:  # gguf raises a variety of errors on corrupt files
        raise BrittleError(f"cannot read GGUF {gguf_path}: {type(e).__name__}: {e}") from e
    # transformers refuses to save a GGUF-loaded model; the weights are already plain fp32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "brittle_source.json").write_text(json.dumps({"gguf": str(gguf_path), "sha256": digest}, indent=2))
    try:
        os.replace(tmp, target)
    except OSError:  # another process converted it meanwhile
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_path(spec: str) -> str:
    """``.gguf`` path, local HF directory or Hub id -> what ``from_pretrained`` takes (presets: see
    :func:`brittle.presets.resolve_model_path`)."""
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise BrittleError(f"GGUF file not found: {path}")
        return str(gguf_to_hf_dir(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise BrittleError(f"{path} exists but is not a Hugging Face model directory (no config.json)")
        return str(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec  # a Hub id; from_pretrained reports network problems itself
    raise UnknownModelError(f"unknown model '{spec}': not a preset, an existing directory, a .gguf file or a Hub id "
                       "of the form owner/name (`brittle models` lists the presets)")


def load_pretrained(path: str, spec: str | None = None, *, dtype: torch.dtype | str = torch.float32,
                    device: str | torch.device | None = None):
    """``(model, tokenizer)`` from what ``from_pretrained`` takes (a directory or Hub id), in eval mode; the
    tokenizer gets a pad token (eos) if it has none. ``spec`` is the name the user gave (for messages and
    :func:`model_id`). ``device="auto"``: accelerate's ``device_map="auto"`` (the layers spread over the GPUs,
    then the CPU, for a model that does not fit one device; each weight stays where it was placed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = spec or path
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        placed = {"device_map": "auto"} if str(device) == "auto" else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placed)
    except OSError as e:
        raise BrittleError(f"cannot load model '{spec}' ({path}): {e}. Offline? Use a preset (`brittle models`), "
                           "a local directory or a .gguf file") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    if device is not None and str(device) != "auto":
        model.to(device)
    model.brittle_spec = spec  # lets score files / manifests say which model they come from
    return model, tok


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical name -> ``[d_out, d_in]`` weight of every linear module (detached views, no copy)."""
    return {n: linear_weight(m).detach() for n, m in linear_modules(model).items()}


def model_id(model: nn.Module) -> str:
    """A human-readable identifier of a loaded model (the spec it was loaded from, or its config name)."""
    return getattr(model, "brittle_spec", None) or getattr(getattr(model, "config", None), "_name_or_path", "") or "unknown"


@torch.no_grad()
def weight_fingerprint(model: nn.Module) -> str:
    """sha256 over the canonical linear weights (names, shapes and fp32 bytes of a strided sample).

    Cheap (samples every 997th element) but sensitive to any training run or ablation in practice;
    used to tie score files to the model they were computed on.
    """
    import hashlib

    h = hashlib.sha256()
    for name, module in linear_modules(model).items():
        w = linear_weight(module).detach()
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(w.reshape(-1)[::997].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Linear modules

# Path components that belong to adapters (PEFT) and never hold base weights.
_ADAPTER_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_dropout", "modules_to_save"}
# Role of a module by its last path component; GPT-2's c_proj depends on its parent (attn or mlp).
_ROLE_ALIASES = {"c_attn": "qkv", "c_fc": "up", "qkv_proj": "qkv", "gate_up_proj": "gate_up", "dense": "o",
                 "query_key_value": "qkv", "fc1": "up", "fc2": "down", "dense_h_to_4h": "up", "dense_4h_to_h": "down",
                 "out_proj": "o", "w1": "gate", "w2": "down", "w3": "up"}


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as ``[d_out, d_in]``; a transposed view for GPT-2's Conv1D (shares storage)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (``model.layers``, ``transformer.h``, ...), PEFT wrappers unwrapped."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    best: nn.ModuleList | None = None
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and name.split(".")[-1] in {"layers", "h", "blocks", "layer"}:
            if any(_is_linear(m) for m in module[0].modules()):
                if best is None or len(module) > len(best):
                    best = module
    if best is None:
        raise BrittleError(f"cannot find the decoder blocks of {type(base).__name__}: no ModuleList named layers/h/blocks")
    return best


def _role(rel_path: str) -> str:
    parts = rel_path.split(".")
    last = parts[-1]
    if last == "c_proj":  # GPT-2: attn.c_proj is the output projection, mlp.c_proj the down projection
        return "o" if "attn" in parts[:-1] else "down"
    if last in _ROLE_ALIASES:
        return _ROLE_ALIASES[last]
    return last[: -len("_proj")] if last.endswith("_proj") else last


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer inside the decoder blocks, by canonical name ``layers.{i}.{role}``.

    Order: block index, then the block's registration order (stable for a given architecture). For a
    PEFT-wrapped model the base layer (``...q_proj.base_layer``) is returned under the same name as in
    the plain model; adapter matrices (lora_A/B) are not listed. Embeddings, norms and ``lm_head``
    are not included (as in the paper).
    """
    out: dict[str, nn.Module] = {}
    for i, block in enumerate(decoder_layers(model)):
        seen_roles: dict[str, str] = {}
        for rel, module in block.named_modules():
            parts = rel.split(".")
            if not rel or not _is_linear(module) or _ADAPTER_PARTS.intersection(parts):
                continue
            if parts[-1] == "base_layer":
                rel = ".".join(parts[:-1])
            role = _role(rel)
            if role in seen_roles:  # an unknown layout with clashing short names: fall back to the path
                role = rel.replace(".", "_")
            seen_roles[role] = rel
            out[f"layers.{i}.{role}"] = module
    if not out:
        raise BrittleError(f"no linear modules found in the decoder blocks of {type(model).__name__}")
    return out


def check_masks(modules: dict[str, nn.Module], masks, what: str = "group") -> None:
    """Raise :class:`BrittleError` unless every mask names one of ``modules`` (canonical names, see
    :func:`linear_modules`) and is a ``torch.bool`` tensor of that module's ``[d_out, d_in]`` shape."""
    for name, mask in masks.items():
        if name not in modules:
            raise BrittleError(f"{what} module '{name}' does not exist in this model (e.g. {next(iter(modules))}; "
                               "a group of another model?)")
        shape = tuple(linear_weight(modules[name]).shape)
        if tuple(mask.shape) != shape or mask.dtype != torch.bool:
            raise BrittleError(f"{what} mask for '{name}' is {mask.dtype}{tuple(mask.shape)}, expected torch.bool{shape}")


def supports_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (transformers computes the LM head only there); a PEFT
    model passes it on to its base model."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def logits_at(model: nn.Module, inputs: dict[str, torch.Tensor], cols: torch.Tensor) -> torch.Tensor:
    """The logits ``[B, len(cols), V]`` at the positions ``cols`` (1-D indices, on any device): the LM head runs only
    there when the model takes ``logits_to_keep`` (every transformers 5 accepts 1-D indices), else all positions are
    computed and ``cols`` taken from them."""
    if supports_logits_to_keep(model):
        return model(**inputs, logits_to_keep=cols.to(inputs["input_ids"].device)).logits
    logits = model(**inputs).logits
    return logits[:, cols.to(logits.device)]
