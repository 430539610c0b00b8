"""Overhead of weight-level freezing (``--freeze-mode weights``) on a LoRA training step.

Times forward + backward of one batch through a LoRA model (r 8, every linear module) without freezing and with a
random group of ``--share`` of each module's entries frozen (the demo's set difference holds 0.34 %), in one
process, alternating, and prints both and their ratio.

    python benchmarks/bench_freeze.py [--model smollm2-135m-safe] [--share 0.0034] [--batch 4] [--tokens 160]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-safe")
    ap.add_argument("--share", type=float, default=0.0034)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from brittle.finetune.train import LoraTrainConfig, make_lora_model
    from brittle.freeze import Freezer, _lora_layers, check_freeze
    from brittle.models import linear_modules, linear_weight
    from brittle.presets import load_model

    model, _ = load_model(args.model)
    gen = torch.Generator().manual_seed(0)
    group = {n: torch.rand(linear_weight(m).shape, generator=gen) < args.share for n, m in linear_modules(model).items()}
    peft_model = make_lora_model(model, LoraTrainConfig(r=8, alpha=16))
    with torch.no_grad():  # non-zero B, as after a few steps
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01, generator=gen)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens), generator=gen)

    def step() -> float:
        t = time.perf_counter()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        for p in peft_model.parameters():
            p.grad = None
        return time.perf_counter() - t

    masks = check_freeze(peft_model, group, "weights", full=False, adapted=set(_lora_layers(peft_model)))
    nnz = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    free, frozen = [], []
    step()
    for _ in range(args.repeats):  # alternate, so that machine noise hits both alike
        free.append(step())
        freezer = Freezer(peft_model, masks, "weights", full=False)
        frozen.append(step())
        freezer.remove()
    f, z = statistics.median(free), statistics.median(frozen)
    print(f"model {args.model}, {len(masks)} modules, {nnz} of {total} entries frozen ({nnz / total:.2%}), "
          f"batch {args.batch} x {args.tokens} tokens, {torch.get_num_threads()} threads")
    print(f"forward+backward, median of {args.repeats}: free {f:.3f} s, frozen {z:.3f} s, ratio {z / f:.2f} "
          f"(overhead {z - f:.3f} s per step)")


if __name__ == "__main__":
    main()
