"""lowrank_optax: Optax optimizers for LoRA factor pairs."""

from lowrank_optax.loraplus import loraplus, scale_b_factor
from lowrank_optax.pairs import DEFAULT_KEYS, LoRAPair, PairKeys
from lowrank_optax.riemannian import (
    scale_by_riemannian_precond,
    scale_by_scaled_adam,
    scaled_adamw,
    scaled_sgd,
)

__all__ = [
    "DEFAULT_KEYS",
    "LoRAPair",
    "PairKeys",
    "loraplus",
    "scale_b_factor",
    "scale_by_riemannian_precond",
    "scale_by_scaled_adam",
    "scaled_adamw",
    "scaled_sgd",
]
