"""Model loading, presets and canonical linear-module naming across architectures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from brittle.assets import AssetError, assemble_parts, dist_file
from brittle.io import BrittleError, sha256_file
from brittle.models import decoder_layers, gguf_to_hf_dir, linear_modules, linear_weight
from brittle.presets import PRESETS, Preset, load_model, register_preset, resolve_model_path
from brittle.testing import TINY_ARCHS, tiny_model

EXPECTED_ROLES = {
    "llama": ["q", "k", "v", "o", "gate", "up", "down"],
    "qwen2": ["q", "k", "v", "o", "gate", "up", "down"],
    "mistral": ["q", "k", "v", "o", "gate", "up", "down"],
    "gemma2": ["q", "k", "v", "o", "gate", "up", "down"],
    "gemma3": ["q", "k", "v", "o", "gate", "up", "down"],
    "phi3": ["o", "qkv", "gate_up", "down"],
    "gpt2": ["qkv", "o", "up", "down"],
}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_linear_modules_names_order_and_shapes(arch):
    model = tiny_model(arch)
    mods = linear_modules(model)
    n_layers = len(decoder_layers(model))
    assert n_layers == 2
    expected = [f"layers.{i}.{r}" for i in range(n_layers) for r in EXPECTED_ROLES[arch]]
    assert list(mods) == expected
    # canonical orientation is [d_out, d_in]: feeding x of width d_in through the module gives d_out
    for name, m in mods.items():
        w = linear_weight(m)
        x = torch.randn(3, w.shape[1])
        assert m(x).shape == (3, w.shape[0]), name
    if arch in {"llama", "qwen2", "mistral", "gemma2", "gemma3"}:  # grouped-query attention: k/v narrower than q
        assert linear_weight(mods["layers.0.k"]).shape[0] == linear_weight(mods["layers.0.q"]).shape[0] // 2


def test_gpt2_conv1d_view_is_transposed_and_shares_storage():
    model = tiny_model("gpt2")
    m = linear_modules(model)["layers.0.up"]
    w = linear_weight(m)
    assert w.shape == (m.weight.shape[1], m.weight.shape[0])
    with torch.no_grad():
        w[3, 5] = 123.0  # an in-place edit through the view reaches the real parameter
    assert m.weight[5, 3].item() == 123.0


def test_linear_modules_of_peft_wrapped_model_match_plain_names():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    plain = {k: linear_weight(v).data_ptr() for k, v in linear_modules(model).items()}
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    mods = linear_modules(wrapped)
    assert list(mods) == list(plain)
    # same underlying weights, and the adapters themselves are never listed
    assert {k: linear_weight(v).data_ptr() for k, v in mods.items()} == plain
    assert all(type(m).__name__ == "Linear" and not hasattr(m, "lora_A") for m in mods.values())


def test_unknown_preset_names_the_alternatives():
    with pytest.raises(BrittleError, match="unknown model 'no-such-model'.*smollm2-135m"):
        resolve_model_path("no-such-model")


def test_missing_wheel_names_the_install_command():
    register_preset(Preset("ghost", "test", lambda: dist_file("no-such-dist-xyz", "x.gguf", "pip install ghost"), "pip install ghost"))
    try:
        with pytest.raises(AssetError, match="'no-such-dist-xyz' is not installed.*pip install ghost"):
            load_model("ghost")
    finally:
        del PRESETS["ghost"]


def test_local_dir_without_config_is_rejected(tmp_path):
    with pytest.raises(BrittleError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_assembled_file_with_wrong_hash_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("BRITTLE_CACHE", str(tmp_path / "cache"))
    parts = []
    for i, chunk in enumerate([b"abc", b"def"]):
        p = tmp_path / f"part{i}"
        p.write_bytes(chunk)
        parts.append(p)
    import hashlib

    good = hashlib.sha256(b"abcdef").hexdigest()
    with pytest.raises(AssetError, match="does not match the expected"):
        assemble_parts(parts, "x.bin", "0" * 64, fix="make assets-qwen")
    assert not (tmp_path / "cache" / "assets" / "x.bin").exists()  # nothing half-written is left
    out = assemble_parts(parts, "x.bin", good, fix="make assets-qwen")
    assert out.read_bytes() == b"abcdef"
    out.write_bytes(b"tampered")  # corruption after assembly is caught on the next use
    with pytest.raises(AssetError, match="does not match"):
        assemble_parts(parts, "x.bin", good, fix="make assets-qwen")


def test_corrupt_gguf_is_reported_with_its_path(tmp_path, monkeypatch):
    monkeypatch.setenv("BRITTLE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(BrittleError, match="cannot read GGUF .*broken.gguf"):
        gguf_to_hf_dir(bad)
    with pytest.raises(BrittleError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))


@pytest.mark.integration
def test_default_model_loads_from_the_conversion_cache(smol_dir, monkeypatch):
    import json

    import transformers

    # a cached conversion is used as it is: reading the GGUF again would fail here
    def no_gguf(*args, **kwargs):
        if kwargs.get("gguf_file"):
            raise AssertionError("the GGUF was read again although its conversion is cached")
        return real(*args, **kwargs)

    real = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)
    model, tok = load_model("smollm2-135m")
    assert len(linear_modules(model)) == 30 * 7
    assert model.dtype == torch.float32
    assert tok.pad_token is not None
    # the cache directory is keyed by the GGUF's sha256, recorded next to the converted weights
    source = json.loads((Path(smol_dir) / "brittle_source.json").read_text())
    digest = sha256_file(source["gguf"])
    assert source["sha256"] == digest and Path(smol_dir).name.endswith(digest[:16])
    assert (Path(smol_dir) / "model.safetensors").stat().st_size > 4 * 100_000_000  # fp32, ~135M parameters


def test_device_auto_places_the_model_with_accelerate_and_scores_alike(smol_tokenizer, tmp_path, monkeypatch):
    """``device="auto"`` loads through accelerate's ``device_map="auto"`` (here: everything on the only device, the
    CPU; nothing is moved afterwards) and gives the weights and scores of a plain load."""
    from transformers import AutoModelForCausalLM

    from brittle.models import load_pretrained
    from brittle.scoring import compute_scores
    from brittle.testing import tiny_model

    tiny_model("llama", vocab_size=len(smol_tokenizer)).save_pretrained(tmp_path / "m")
    smol_tokenizer.save_pretrained(tmp_path / "m")
    seen, original = [], AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: seen.append(k.get("device_map")) or original(*a, **k))
    auto, tok = load_pretrained(str(tmp_path / "m"), device="auto")
    plain, _ = load_pretrained(str(tmp_path / "m"))
    assert seen == ["auto", None]
    assert {p.device.type for p in auto.parameters()} == {"cpu"}
    assert all(torch.equal(a, b) for a, b in zip(auto.state_dict().values(), plain.state_dict().values(), strict=True))
    ex = [{"input_ids": torch.arange(3, 15), "labels": torch.cat([torch.full((6,), -100), torch.arange(9, 15)])}]
    s_auto = compute_scores(auto, None, ex, "snip", batch_size=1, max_length=None, progress=False)
    s_plain = compute_scores(plain, None, ex, "snip", batch_size=1, max_length=None, progress=False)
    assert all(torch.equal(s_auto[n], s_plain[n]) for n in s_plain)


def test_logits_at_equals_the_full_logits_at_those_positions():
    """The LM head only at the positions asked for (``logits_to_keep``), or, for a model without that argument,
    the same positions taken from all: both equal the full logits there."""
    from brittle.models import logits_at, supports_logits_to_keep

    model = tiny_model("llama")
    inputs = {"input_ids": torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0)),
              "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    cols = torch.tensor([1, 4, 8])
    with torch.no_grad():
        full = model(**inputs).logits[:, cols]

        class NoKeep(torch.nn.Module):  # a causal LM whose forward has no logits_to_keep
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask):
                return self.inner(input_ids=input_ids, attention_mask=attention_mask)

        plain = NoKeep(model)
        assert supports_logits_to_keep(model) and not supports_logits_to_keep(plain)
        for m in (model, plain):
            got = logits_at(m, inputs, cols)
            assert got.shape == full.shape and (got - full).abs().max() <= 1e-5 * full.abs().max()
