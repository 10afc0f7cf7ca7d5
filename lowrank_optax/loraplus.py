"""LoRA+: a larger learning rate for the output-side factor ``b`` (Hayou, Ghosh & Yu, 2024).

LoRA+ trains ``B`` (paper notation; our ``b``) with ``λ`` times the learning rate of ``A``
(recommended ``λ = 2⁴ = 16``). For every optimizer whose update is proportional to its learning
rate (SGD, Adam/AdamW with decoupled decay, the library's pair optimizers), multiplying the
``b`` updates by ``λ`` after the base optimizer is exactly training ``b`` with ``λ·lr``. Doing
it as a post-scaling, rather than with two optimizer instances in ``optax.multi_transform``,
keeps pair-aware base optimizers (which need both factors together) working.

Leaves outside pairs: PEFT's ``create_loraplus_optimizer`` silently puts every trainable 1-D
parameter (biases, norms) into the ``b`` group, giving them ``λ·lr``. Here such leaves are an
error by default (``non_pair="error"``), or keep the base optimizer's update unchanged
(``non_pair="keep"``); nothing is scaled by ``λ`` without being a ``b`` factor.

Reference: S. Hayou, N. Ghosh and B. Yu, "LoRA+: Efficient Low Rank Adaptation of Large
Models", ICML 2024.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import optax

from lowrank_optax.pairs import (
    DEFAULT_KEYS,
    STRAY_LEAF,
    PairKeys,
    PairTree,
    keep_update_dtypes,
)
from lowrank_optax.validation import (
    check_choice,
    check_hyperparams,
    check_keys,
    with_state_check,
)

__all__ = ["loraplus", "scale_b_factor"]

_NON_PAIR = ("error", "keep")


def _pair_structure(tree: Any, what: str, keys: PairKeys, non_pair: str) -> PairTree:
    try:
        return PairTree(tree, keys, what, strays=non_pair)
    except ValueError as err:
        hint = ("\nPass non_pair='keep' to train leaves outside pairs at the base learning "
                "rate." if STRAY_LEAF in str(err) else "")
        raise ValueError(f"loraplus: {err}{hint}") from None


def scale_b_factor(
    ratio: float | jax.Array,
    *,
    non_pair: Literal["error", "keep"] = "error",
    keys: PairKeys = DEFAULT_KEYS,
) -> optax.GradientTransformation:
    """Multiplies the updates of every pair's ``b`` factor by ``ratio``; ``a`` is unchanged.

    Args:
      ratio: the LoRA+ ratio ``λ = lr_b / lr_a > 0``.
      non_pair: what to do with leaves outside pairs: ``"error"`` (default) raises naming every
        such tree path; ``"keep"`` passes their updates through unscaled.
      keys: mapping keys of the factors in the tree.
    """
    check_hyperparams("scale_b_factor", ratio=ratio)
    check_choice("scale_b_factor", "non_pair", non_pair, _NON_PAIR)
    check_keys("scale_b_factor", keys)

    def init_fn(params: optax.Params) -> optax.EmptyState:
        _pair_structure(params, "params", keys, non_pair)  # errors at init, as every method's
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        structure = _pair_structure(updates, "updates", keys, non_pair)
        scaled = [None if p is None else p._replace(b=p.b * ratio) for p in structure.pairs]
        return structure.rebuild(updates, scaled), state

    return optax.GradientTransformation(init_fn, update_fn)


def loraplus(
    *base_and_ratio: Any,
    ratio: float | jax.Array | None = None,
    learning_rate: optax.ScalarOrSchedule | None = None,
    non_pair: Literal["error", "keep"] = "error",
    keys: PairKeys = DEFAULT_KEYS,
    **base_kwargs: Any,
) -> optax.GradientTransformation:
    """LoRA+ over any optimizer: the ``b`` factor trains with ``ratio ×`` the learning rate.

    Called as ``loraplus(base, ratio=16.0, *, learning_rate=None, **base_kwargs)``. Either pass
    a ready transformation, ``loraplus(optax.adamw(1e-4), 16)``, or a factory and its
    arguments, ``loraplus(optax.adamw, 16, learning_rate=1e-4, weight_decay=0.0)``; the latter
    form works under ``optax.inject_hyperparams``, which injects ``learning_rate`` (and
    ``ratio`` when given by keyword): ``optax.inject_hyperparams(loraplus)(optax.adamw, 16.0,
    learning_rate=1e-3)``, with an optax or a lowrank_optax factory. (The base and the ratio
    are variadic so that ``inject_hyperparams`` does not take the factory for a schedule.)

    Args:
      *base_and_ratio: ``base``, an ``optax.GradientTransformation`` whose update is
        proportional to its learning rate (any optax optimizer, or a pair optimizer of this
        library), or a factory of one; optionally followed by ``ratio``.
      ratio: ``λ = lr_b / lr_a > 0``; default 16 (= 2⁴, the paper's recommendation).
      learning_rate: the factory's learning rate (``lr_a``); ``None`` leaves it to the factory.
      non_pair: ``"error"`` (default) or ``"keep"``: see :func:`scale_b_factor`.
      keys: mapping keys of the factors in the tree.
      **base_kwargs: further arguments of ``base`` when it is a factory.

    Updates keep the dtype of the incoming gradients (bf16 stays bf16).
    """
    # optax.inject_hyperparams calls the factory again with every bound argument by keyword.
    base_and_ratio = base_and_ratio or tuple(base_kwargs.pop("base_and_ratio", ()))
    base_kwargs = {**base_kwargs.pop("base_kwargs", {}), **base_kwargs}
    if not 1 <= len(base_and_ratio) <= 2:
        raise TypeError("loraplus takes the base optimizer (or factory) and optionally the ratio "
                        f"as positional arguments, got {len(base_and_ratio)}")
    base = base_and_ratio[0]
    if len(base_and_ratio) == 2:
        if ratio is not None:
            raise TypeError("loraplus got ratio both positionally and by keyword")
        ratio = base_and_ratio[1]
    ratio = 16.0 if ratio is None else ratio
    check_hyperparams("loraplus", ratio=ratio,
                      **({} if learning_rate is None else {"learning_rate": learning_rate}))
    check_choice("loraplus", "non_pair", non_pair, _NON_PAIR)
    if learning_rate is not None:
        base_kwargs["learning_rate"] = learning_rate
    if not isinstance(base, optax.GradientTransformation):
        if not callable(base):
            raise TypeError(f"loraplus: base must be an optax.GradientTransformation or a "
                            f"factory of one, got {base!r}")
        base = base(**base_kwargs)
    elif base_kwargs:
        raise TypeError(f"loraplus got keyword arguments {sorted(base_kwargs)} for a ready "
                        "transformation; pass a factory to configure it")
    tx = optax.with_extra_args_support(keep_update_dtypes(
        optax.chain(base, scale_b_factor(ratio, non_pair=non_pair, keys=keys))))

    def update_fn(updates, state, params=None, **extra_args):
        if params is not None:  # the pairs' shapes checked before the base optimizer sees them
            _pair_structure(params, "params", keys, non_pair).pairs_of(updates, "updates")
        return tx.update(updates, state, params, **extra_args)

    return with_state_check("loraplus", optax.GradientTransformationExtraArgs(tx.init, update_fn),
                            keys, needs_params=False)
