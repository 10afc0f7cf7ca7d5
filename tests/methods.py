"""Registry of every optimizer the test battery runs through: adding a method is one entry.

``factory(learning_rate, **kwargs)`` builds the full optimizer; ``learning_rate`` is one at which
the method solves the battery's matrix-factorisation problem from a zero-initialised ``b``
(see ``problems.py``) within ``steps`` steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optax

import lowrank_optax as lro
from lowrank_optax import altlora as _altlora
from lowrank_optax import solora as _solora
from lowrank_optax import lora_pro as _lora_pro


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    factory: Callable[..., optax.GradientTransformation]
    learning_rate: float
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    steps: int = 300

    def make(self, learning_rate: Any = None) -> optax.GradientTransformation:
        lr = self.learning_rate if learning_rate is None else learning_rate
        return self.factory(lr, **self.kwargs)

    def injected(self) -> optax.GradientTransformation:
        return optax.inject_hyperparams(self.factory)(self.learning_rate, **self.kwargs)

    def __str__(self) -> str:
        return self.name


def _loraplus_adamw(learning_rate, ratio=4.0):
    return lro.loraplus(optax.adamw, ratio, learning_rate=learning_rate, weight_decay=0.0)


METHODS: list[Method] = [
    Method("scaled_sgd", lro.scaled_sgd, 0.3),
    Method("scaled_adamw", lro.scaled_adamw, 0.03),
    Method("loraplus_adamw", _loraplus_adamw, 0.03),
    Method("altlora", _altlora.altlora, 0.1),
    Method("altlora_plus", _altlora.altlora_plus, 0.1),
    Method("lora_pro_sgd", _lora_pro.lora_pro_sgd, 0.3),
    Method("lora_pro_adamw", _lora_pro.lora_pro_adamw, 0.05),
    Method("lora_pro_adamw_factor", _lora_pro.lora_pro_adamw, 0.03, {"full_state": False}),
    Method("solora_sgd", _solora.solora_sgd, 0.01),
    Method("solora_adamw", _solora.solora_adamw, 0.03),
    Method("solora_adamw_factor", _solora.solora_adamw, 0.03, {"moment": "factor"}),
]

BY_NAME = {m.name: m for m in METHODS}

