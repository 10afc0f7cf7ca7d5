"""Flax ``nnx`` integration: LoRA layers, injection by module path, merge/unmerge."""

from lowrank_optax.flax.lora import (
    INITS,
    LoRALinear,
    inject_lora,
    lora_modules,
    merge_lora,
    unmerge_lora,
)
from lowrank_optax.grad_stats import lora_matmul_with_stats, stats_probe

__all__ = [
    "INITS",
    "LoRALinear",
    "inject_lora",
    "lora_matmul_with_stats",
    "lora_modules",
    "merge_lora",
    "stats_probe",
    "unmerge_lora",
]
