"""Methods whose state is O((m + n) r) never form an m×n array in their update (issue 12: "no
m×n temporaries where an (m+n)r form exists"); the methods that keep an m×n state are listed."""

from __future__ import annotations

import jax
import pytest
from methods import METHODS, Method

M, N, R = 40, 24, 3
# Methods whose own state is m×n per pair (the published rule keeps a moment of the m×n
# gradient or of its tangent projection), so m×n arrays are their working set.
DENSE_STATE = {"lora_pro_adamw", "solora_adamw", "adams", "adams_low_memory",
               "adams_riemannian_robust", "sylvester_lift_adam"}


def _jaxprs_in(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr"):
        yield from _jaxprs_in(value.jaxpr)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _jaxprs_in(item)


def _all_shapes(jaxpr) -> set[tuple[int, ...]]:
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes.update(tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in _jaxprs_in(param):
                shapes |= _all_shapes(sub)
    return shapes


def _dense_shapes(method: Method) -> set[tuple[int, ...]]:
    k_a, k_b = jax.random.split(jax.random.key(0))
    params = {"lora_a": jax.random.normal(k_a, (M, R)), "lora_b": jax.random.normal(k_b, (R, N))}
    tx = method.make()
    jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params).jaxpr
    return {s for s in _all_shapes(jaxpr) if M in s and N in s}


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_no_m_by_n_array_unless_the_state_is_m_by_n(method: Method):
    dense = _dense_shapes(method)
    if method.name in DENSE_STATE:
        assert dense  # the walk sees inside the update: these methods do form m×n arrays
    else:
        assert not dense, dense
