"""lowrank_optax: Optax optimizers for LoRA factor pairs.

Every optimizer is an ``optax.GradientTransformation`` over a tree of LoRA pairs
(``delta_W = scale · a @ b``, ``a: (..., m, r)``, ``b: (..., r, n)``), found as
:class:`LoRAPair` nodes or as ``<prefix>lora_a`` / ``<prefix>lora_b`` entries of a mapping
(multi-dimensional factors: :class:`PairDimensionNumbers`).
"""

from lowrank_optax.altlora import (
    ScaleByAltLoRAState,
    altlora,
    altlora_active,
    altlora_plus,
    scale_by_altlora,
)
from lowrank_optax.cross_term import clip_cross_term
from lowrank_optax.lora_pro import (
    ScaleByLoRAProAdamState,
    lora_pro_adamw,
    lora_pro_sgd,
    scale_by_lora_pro,
    scale_by_lora_pro_adam,
)
from lowrank_optax.lora_rite import (
    ScaleByLoRARiteState,
    balance_factor_norms,
    lora_rite,
    scale_by_lora_rite,
)
from lowrank_optax.lora_s import adams, lracs, scale_by_adams, scale_by_lracs, sylvester_lift
from lowrank_optax.loraplus import loraplus, scale_b_factor
from lowrank_optax.pairs import DEFAULT_KEYS, LoRAPair, PairDimensionNumbers, PairKeys
from lowrank_optax.quotient import quotient_sgd, scale_by_quotient
from lowrank_optax.riemannian import (
    scale_by_riemannian_precond,
    scale_by_scaled_adam,
    scaled_adamw,
    scaled_sgd,
)
from lowrank_optax.solora import (
    SoLoRAPairState,
    SoLoRAState,
    scale_by_solora,
    solora_adamw,
    solora_sgd,
)

__all__ = [
    "DEFAULT_KEYS",
    "LoRAPair",
    "PairDimensionNumbers",
    "PairKeys",
    "ScaleByAltLoRAState",
    "ScaleByLoRAProAdamState",
    "ScaleByLoRARiteState",
    "SoLoRAPairState",
    "SoLoRAState",
    "adams",
    "altlora",
    "altlora_active",
    "altlora_plus",
    "balance_factor_norms",
    "clip_cross_term",
    "lora_pro_adamw",
    "lora_pro_sgd",
    "lora_rite",
    "loraplus",
    "lracs",
    "quotient_sgd",
    "scale_b_factor",
    "scale_by_adams",
    "scale_by_altlora",
    "scale_by_lora_pro",
    "scale_by_lora_pro_adam",
    "scale_by_lora_rite",
    "scale_by_lracs",
    "scale_by_quotient",
    "scale_by_riemannian_precond",
    "scale_by_scaled_adam",
    "scale_by_solora",
    "scaled_adamw",
    "scaled_sgd",
    "solora_adamw",
    "solora_sgd",
    "sylvester_lift",
]
