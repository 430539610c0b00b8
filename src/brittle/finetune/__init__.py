"""Fine-tuning: the one trainer (:mod:`.train`: LoRA or full, freezing, schedules, checkpoints) and the
fine-tuning job of the ``finetune`` stage (:mod:`.job`: data, drift tracking, evaluation before/after, files)."""

from .job import ATTACK_DEFAULTS, FINETUNE_DATA, FinetuneConfig, FinetuneTrainConfig, finetune_examples, run_finetune
from .train import (
    KEEP_CHECKPOINTS,
    LoraTrainConfig,
    TrainHistory,
    lora_target_modules,
    make_lora_model,
    merge_lora,
    train_lora,
)

__all__ = ["ATTACK_DEFAULTS", "FINETUNE_DATA", "KEEP_CHECKPOINTS", "FinetuneConfig", "FinetuneTrainConfig",
           "LoraTrainConfig", "TrainHistory", "finetune_examples", "lora_target_modules", "make_lora_model",
           "merge_lora", "run_finetune", "train_lora"]
