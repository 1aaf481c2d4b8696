"""`LowRankUpdateLinearOperator`: `A + U C V`, a square operator plus a low-rank
term, kept apart so that a solve can use the Woodbury identity."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import ArrayLike

from .._misc import describe, strip_weak_dtype
from .._tags import as_tags, transpose_tags
from ._arguments import check_not_sequence
from .base import (
    AbstractLinearOperator,
    conj,
    diagonal,
    has_cheap_diagonal,
    holds_values,
    is_cacheable,
    linearise,
    materialise,
    reads_every_leaf,
    register_scaled,
    register_tag_predicates,
    scaled,
    scaled_tags,
)
from .matrix import MatrixLinearOperator


# What a rank-k factor of each name maps (the shape its array takes).
_FACTOR_SHAPES = {
    "operator": "(n, n)",
    "u": "(n, k)",
    "c": "(k, k)",
    "v": "(k, n)",
}
_RANK_ONE = {
    "operator": "",
    "u": " For a rank-one update pass `u[:, None]`.",
    "c": " For a rank-one update with a scalar `c` pass `jnp.array([[c]])`.",
    "v": " For a rank-one update pass `v[None, :]`.",
}


def _as_operator(x: Any, name: str) -> AbstractLinearOperator:
    if isinstance(x, AbstractLinearOperator):
        return x
    check_not_sequence(x, name)
    expected = (
        f"`{name}` must be a `lineax.AbstractLinearOperator` or a 2-D array of "
        f"shape {_FACTOR_SHAPES[name]}"
    )
    if hasattr(x, "shape"):
        if jnp.ndim(x) == 2:
            return MatrixLinearOperator(x)
        raise ValueError(
            f"{expected}, got an array of shape {tuple(x.shape)}.{_RANK_ONE[name]}"
        )
    raise TypeError(f"{expected}, got {type(x).__name__}.{_RANK_ONE[name]}")


def _check_same(got: Any, want: Any, message: str) -> None:
    if strip_weak_dtype(got) != strip_weak_dtype(want):
        raise ValueError(f"{message}; got {describe(got)}, expected {describe(want)}.")


class LowRankUpdateLinearOperator(AbstractLinearOperator):
    """The operator `A + U C V`: a square operator `A` plus a rank-`k` update.

    `mv` costs one `mv` of each part, and the update is never formed. Solve it
    with [`lineax.Woodbury`][] (which [`lineax.AutoLinearSolver`][] picks): it
    reuses a solve with `A` and factorises only a `k×k` matrix.

    **Arguments:**

    - `operator`: `A`, a square linear operator; nonsingular, for
        [`lineax.Woodbury`][] to solve the sum.
    - `u`: `U`, mapping the rank-`k` space into `A`'s output space (an operator,
        or a 2-D array of shape `(n, k)` when `A` acts on 1-D vectors).
    - `c`: `C`, the `k×k` middle factor (an operator or a 2-D array).
    - `v`: `V`, mapping `A`'s input space onto the rank-`k` space (an operator, or
        a 2-D array of shape `(k, n)`).
    - `tags`: structure of the sum, which cannot be read from the parts at trace
        time: e.g. [`lineax.symmetric_tag`][] when `A` is symmetric and
        `V = Uᵀ` with `C` symmetric, [`lineax.positive_semidefinite_tag`][] when
        moreover `A` and `C` are positive semidefinite.

    All four parts must have one dtype.
    """

    operator: AbstractLinearOperator
    u: AbstractLinearOperator
    c: AbstractLinearOperator
    v: AbstractLinearOperator
    tags: frozenset = eqx.field(static=True)

    def __init__(
        self,
        operator: AbstractLinearOperator | ArrayLike,
        u: AbstractLinearOperator | ArrayLike,
        c: AbstractLinearOperator | ArrayLike,
        v: AbstractLinearOperator | ArrayLike,
        tags: Any = (),
    ):
        self.operator = _as_operator(operator, "operator")
        self.u = _as_operator(u, "u")
        self.c = _as_operator(c, "c")
        self.v = _as_operator(v, "v")
        self.tags = as_tags(tags)
        a = self.operator
        if a.in_size() != a.out_size():
            raise ValueError(
                "`operator` (A in `A + U C V`) must be square, but has input size "
                f"{a.in_size()} and output size {a.out_size()}."
            )
        _check_same(
            self.u.out_structure(),
            a.out_structure(),
            "The output structure of `u` must equal that of `operator`",
        )
        _check_same(
            self.v.in_structure(),
            a.in_structure(),
            "The input structure of `v` must equal that of `operator`",
        )
        _check_same(
            self.c.out_structure(),
            self.u.in_structure(),
            "The output structure of `c` must equal the input structure of `u` "
            "(the rank-k space)",
        )
        _check_same(
            self.c.in_structure(),
            self.v.out_structure(),
            "The input structure of `c` must equal the output structure of `v` "
            "(the rank-k space)",
        )

    def mv(self, vector):
        update = self.u.mv(self.c.mv(self.v.mv(vector)))
        return jtu.tree_map(lambda a, b: a + b, self.operator.mv(vector), update)

    def as_matrix(self):
        highest = jax.lax.Precision.HIGHEST
        cv = jnp.matmul(self.c.as_matrix(), self.v.as_matrix(), precision=highest)
        update = jnp.matmul(self.u.as_matrix(), cv, precision=highest)
        return self.operator.as_matrix() + update

    def transpose(self):
        return LowRankUpdateLinearOperator(
            self.operator.transpose(),
            self.v.transpose(),
            self.c.transpose(),
            self.u.transpose(),
            transpose_tags(self.tags),
        )

    def in_structure(self):
        return self.operator.in_structure()

    def out_structure(self):
        return self.operator.out_structure()


register_tag_predicates(LowRankUpdateLinearOperator)


def _map(fn, operator: LowRankUpdateLinearOperator) -> LowRankUpdateLinearOperator:
    return LowRankUpdateLinearOperator(
        fn(operator.operator),
        fn(operator.u),
        fn(operator.c),
        fn(operator.v),
        operator.tags,
    )


@diagonal.register(LowRankUpdateLinearOperator)
def _(operator):
    # diag(U C V)_i = sum_j (U C)_ij V_ji: O(n k^2), without forming U C V.
    uc = jnp.matmul(
        operator.u.as_matrix(),
        operator.c.as_matrix(),
        precision=jax.lax.Precision.HIGHEST,
    )
    update = jnp.sum(uc * operator.v.as_matrix().T, axis=1)
    return diagonal(operator.operator) + update


@register_scaled(LowRankUpdateLinearOperator)
def _(operator, kind, scalar=None):
    # `s (A + U C V) = (s A) + U (s C) V`: a low-rank update still, solved by the
    # Woodbury identity.
    return LowRankUpdateLinearOperator(
        scaled(operator.operator, kind, scalar),
        operator.u,
        scaled(operator.c, kind, scalar),
        operator.v,
        scaled_tags(operator, kind, scalar),
    )


materialise.register(LowRankUpdateLinearOperator)(lambda op: _map(materialise, op))
linearise.register(LowRankUpdateLinearOperator)(lambda op: _map(linearise, op))
conj.register(LowRankUpdateLinearOperator)(lambda op: _map(conj, op))
is_cacheable.register(LowRankUpdateLinearOperator)(
    lambda op: all(is_cacheable(x) for x in (op.operator, op.u, op.c, op.v))
)
reads_every_leaf.register(LowRankUpdateLinearOperator)(
    lambda op: all(reads_every_leaf(x) for x in (op.operator, op.u, op.c, op.v))
)
holds_values.register(LowRankUpdateLinearOperator)(
    lambda op: all(holds_values(x) for x in (op.operator, op.u, op.c, op.v))
)
# `diagonal` above reads `A`'s diagonal and the matrices of `U`, `C` and `V`.
has_cheap_diagonal.register(LowRankUpdateLinearOperator)(
    lambda op: (
        has_cheap_diagonal(op.operator)
        and all(holds_values(x) for x in (op.u, op.c, op.v))
    )
)
