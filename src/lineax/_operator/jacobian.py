"""`JacobianLinearOperator`: the Jacobian of a function at a point."""

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.tree_util as jtu
from jaxtyping import PyTree

from .._misc import (
    inexact_asarray,
    promoting_call,
    Static,
    strip_weak_dtype,
    structure_of,
    varying_like,
)
from .._tags import as_tags, transpose_tags
from ._arguments import check_leaf_arrays, output_structure_of
from .base import (
    AbstractLinearOperator,
    concrete_arrays,
    is_cacheable,
    linearise,
    materialise,
    matrix_by_mv,
    register_tag_predicates,
)
from .function import (
    closure_converted,
    FunctionLinearOperator,
    holds_its_jaxpr,
    in_context,
    jacobian_operator,
    real_to_complex,
    transpose_is_self,
)


class JacobianLinearOperator(AbstractLinearOperator):
    """The Jacobian `d fn(x, args) / dx` of a function at a point, as a linear
    operator; matrix-vector products are computed by autodifferentiation without
    forming the Jacobian.

    **Arguments:**

    - `fn`: a function `(x, args) -> y` between PyTrees of arrays.
    - `x`: the point at which to linearise: a PyTree of arrays (JAX or NumPy) or
        Python scalars, converted as by `jnp.asarray` (integers in the default
        floating dtype).
    - `args`: any extra argument to `fn` (not differentiated by `mv`).
    - `tags`: a tag or iterable of tags.
    - `jac`: how to compute products. `None` (default): forward mode (JVPs) for
        `mv`, reverse mode for the transpose. `"fwd"`: forward mode everywhere.
        `"bwd"`: reverse mode (VJPs) everywhere, which works for functions that
        have a `jax.custom_vjp` but no JVP rule.
    - `closure_convert`: whether to closure-convert `fn` (see
        [`lineax.FunctionLinearOperator`][]).

    Use [`lineax.linearise`][] to cache the linearisation when many `mv`s are made.
    """

    fn: Callable
    x: PyTree[Any]
    args: PyTree[Any]
    output_structure: Static = eqx.field(static=True)
    tags: frozenset = eqx.field(static=True)
    jac: Literal["fwd", "bwd"] | None = eqx.field(static=True)

    def __init__(
        self,
        fn: Callable,
        x: PyTree[Any],
        args: PyTree[Any] = None,
        tags: Any = (),
        jac: Literal["fwd", "bwd"] | None = None,
        closure_convert: bool = True,
    ):
        if jac not in (None, "fwd", "bwd"):
            raise ValueError(f'`jac` must be None, "fwd" or "bwd", got {jac!r}.')
        if not callable(fn):
            raise TypeError(f"`fn` must be callable, got {type(fn).__name__}.")
        check_leaf_arrays(x, "x")
        x = jtu.tree_map(inexact_asarray, x)
        # Inside `jax.shard_map`, typed as varying over every manual axis, as the
        # vectors it is applied to are cast to (see `in_context`): the converted
        # function replays the casts it recorded at `x`.
        x = varying_like(x, in_context(structure_of(x)))
        fn = closure_converted(fn, closure_convert, x, args)
        out_struct = output_structure_of(
            fn,
            (x, args),
            "Calling `fn(x, args)` failed; check that `fn` takes two arguments, the "
            "point `x` and `args` (pass `args=None` if it needs none: `lambda x, "
            "args: ...`), and that `x` is the input it expects.",
            inexact=True,
        )
        self.fn = fn
        self.x = x
        self.args = args
        self.output_structure = Static(strip_weak_dtype(out_struct))
        self.tags = as_tags(tags)
        self.jac = jac

    def _fn_of_x(self, x):
        return self.fn(x, self.args)

    def mv(self, vector):
        return promoting_call(self._mv, self.in_structure(), vector)

    def _mv(self, vector):
        if self.jac == "bwd":
            _, vjp_fn = jax.vjp(self._fn_of_x, self.x)
            out_structure = in_context(self.out_structure())
            vector = varying_like(vector, out_structure)
            (out,) = jax.linear_transpose(vjp_fn, out_structure)((vector,))
            return out
        vector = varying_like(vector, self.x)
        _, out = jax.jvp(self._fn_of_x, (self.x,), (vector,))
        return out

    def as_matrix(self):
        if self.jac == "bwd" or (self.jac is None and self.in_size() > self.out_size()):
            if real_to_complex(self.in_structure(), self.out_structure()):
                # The VJPs below would give only the real part of each row.
                return materialise(self).as_matrix()
            # Reverse mode: rows of the Jacobian from VJPs.
            return matrix_by_mv(self.transpose()).T
        return matrix_by_mv(self)

    def transpose(self):
        if transpose_is_self(self):
            return self
        tags = transpose_tags(self.tags)
        if self.jac == "fwd":
            jvp_fn = lambda v: jax.jvp(self._fn_of_x, (self.x,), (v,))[1]
            transpose_fn = jax.linear_transpose(jvp_fn, in_context(self.in_structure()))
            return FunctionLinearOperator(
                lambda w: transpose_fn(w)[0], self.out_structure(), tags
            )
        _, vjp_fn = jax.vjp(self._fn_of_x, self.x)
        return FunctionLinearOperator(
            lambda w: vjp_fn(w)[0], self.out_structure(), tags
        )

    def in_structure(self):
        return structure_of(self.x)

    def out_structure(self):
        return self.output_structure.value


register_tag_predicates(JacobianLinearOperator)
# (As a function operator: see there. `args` may hold anything; only arrays here.)
is_cacheable.register(JacobianLinearOperator)(
    lambda op: holds_its_jaxpr(op.fn) and concrete_arrays((op.x, op.args))
)


@materialise.register(JacobianLinearOperator)
def _(operator):
    return jacobian_operator(
        operator._fn_of_x,
        operator.x,
        operator.in_structure(),
        operator.out_structure(),
        operator.tags,
        operator.jac,
    )


@linearise.register(JacobianLinearOperator)
def _(operator):
    if operator.jac == "bwd":
        _, vjp_fn = jax.vjp(operator._fn_of_x, operator.x)
        mv = jax.linear_transpose(vjp_fn, in_context(operator.out_structure()))
        fn = lambda v: mv((v,))[0]
    else:
        _, fn = jax.linearize(operator._fn_of_x, operator.x)
    return FunctionLinearOperator(fn, operator.in_structure(), operator.tags)
