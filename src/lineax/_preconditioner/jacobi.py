"""`JacobiPreconditioner`: the inverse of an operator's diagonal."""

from typing import Any, SupportsIndex

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Inexact, PRNGKeyArray

from .._misc import checked_count, result_dtype, select, Static
from .._operator.base import (
    AbstractLinearOperator,
    concrete_arrays,
    diagonal,
    has_cheap_diagonal,
    is_cacheable,
    is_negative_semidefinite,
    is_positive_semidefinite,
    reads_every_leaf,
)
from .._tags import diagonal_tag
from .base import (
    AbstractPreconditioner,
    apply_flat,
    check_square,
    checked_key,
    definite_tags,
    flat_mv,
    replace_fields,
    usable_pivots,
)


def probe_diagonal_estimate(operator: Any, probes: int, key: PRNGKeyArray) -> Array:
    """The stochastic diagonal estimator of Bekas, Kokiopoulou and Saad ("An
    estimator for the diagonal of a matrix", Appl. Numer. Math. 57, 2007):
    `d ≈ Σₖ vₖ ⊙ A vₖ ⊘ Σₖ vₖ ⊙ vₖ` over Rademacher vectors `vₖ`.

    Exact for a diagonal matrix; otherwise entry `i` errs by the average of
    `Σⱼ≠ᵢ aᵢⱼ vᵢ vⱼ`, of standard deviation `‖aᵢ,≠ᵢ‖₂ / √probes`.
    """
    size = operator.in_size()
    dtype = result_dtype(operator.in_structure(), operator.out_structure())
    # (Not `jr.rademacher`: with x64 enabled it draws float64 uniforms, whatever
    # the dtype asked for, slow on a GPU and an error on a TPU. The top bit of the
    # raw bits is its sign without x64, where it draws float32 uniforms `< 0.5`.)
    heads = jr.bits(key, (probes, size), jnp.uint32) < np.uint32(2**31)
    one = jnp.ones((), dtype)
    signs = select(heads, one, -one)
    products = jax.vmap(flat_mv(operator))(signs)
    # Rademacher entries square to one, so the denominator is `probes`.
    return jnp.mean(signs * products, axis=0)


class JacobiPreconditioner(AbstractPreconditioner):
    """The Jacobi (diagonal) preconditioner: `P = diag(A)⁻¹`.

    The diagonal comes from [`lineax.diagonal`][], which reads it from a matrix,
    diagonal or tridiagonal operator (or an operator tagged diagonal or
    tridiagonal) at no or little cost. A matrix-free operator (e.g. a
    [`lineax.FunctionLinearOperator`][]) has no cheap diagonal: pass `probes` to
    estimate it from that many matrix-vector products with random ±1 vectors (the
    estimator of Bekas, Kokiopoulou and Saad, 2007, exact for diagonal operators and
    with an error falling as `1/√probes` otherwise), or materialise the operator
    yourself with [`lineax.materialise`][]. It is never materialised silently: that
    would cost `n` matrix-vector products and `n²` memory. (For a complex operator
    tagged positive or negative semidefinite, hence Hermitian, the estimate's real
    part is used: a Hermitian diagonal is real.)

    Diagonal entries that are zero (or, when estimated for a positive or negative
    definite operator, of the wrong sign) cannot be inverted; they are replaced by
    the largest diagonal entry in magnitude (with the operator's sign), which leaves
    those components lightly preconditioned rather than infinite.

    The result is tagged diagonal, and positive (negative) semidefinite when the
    operator is.

    **Arguments:**

    - `operator`: a square linear operator `A`.
    - `probes`: `None` to use the exact diagonal, or the number of random probe
        vectors with which to estimate it (one batched matrix-vector product).
    - `key`: the random key for the probes. Defaults to `jax.random.key(0)`.
    """

    inverse_diagonal: Inexact[Array, " size"]
    input_structure: Static = eqx.field(static=True)
    output_structure: Static = eqx.field(static=True)
    tags: frozenset = eqx.field(static=True)

    def __init__(
        self,
        operator: AbstractLinearOperator,
        probes: SupportsIndex | None = None,
        *,
        key: PRNGKeyArray | None = None,
    ):
        check_square(operator, "JacobiPreconditioner")
        positive = is_positive_semidefinite(operator)
        negative = (not positive) and is_negative_semidefinite(operator)
        if probes is None:
            if not has_cheap_diagonal(operator):
                raise ValueError(
                    "`JacobiPreconditioner` cannot read the diagonal of a matrix-free "
                    f"operator ({type(operator).__name__}) without materialising it. "
                    "Pass `probes=k` to estimate the diagonal from k random "
                    "matrix-vector products, tag the operator "
                    "`lx.diagonal_tag`/`lx.tridiagonal_tag` if it has that "
                    "structure, or pass `lx.materialise(operator)` if it is small."
                )
            diag = diagonal(operator)
        else:
            probes = checked_count(probes, "probes", 1, or_none=True)
            diag = probe_diagonal_estimate(operator, probes, checked_key(key))
            if (positive or negative) and jnp.iscomplexobj(diag):
                # A Hermitian operator's diagonal is real, and so is the estimate
                # of it (the real part, itself unbiased): the complex one, off by
                # the imaginary parts of the off-diagonal entries it averages,
                # made a preconditioner that is not Hermitian, tagged positive
                # definite, with which CG ran to `max_steps` (300 steps where it
                # needs 60 unpreconditioned).
                diag = jnp.real(diag).astype(diag.dtype)
        invertible = usable_pivots(diag, positive, negative)
        # (`initial`: an operator of size 0 has no largest entry.)
        largest = jnp.max(jnp.abs(diag), initial=0)
        fallback = jnp.where(largest > 0, largest, 1).astype(diag.dtype)
        fallback = -fallback if negative else fallback
        diag = jnp.where(invertible, diag, fallback)
        self.inverse_diagonal = 1 / diag
        self.input_structure = Static(operator.out_structure())
        self.output_structure = Static(operator.in_structure())
        self.tags = definite_tags(operator) | {diagonal_tag}

    def mv(self, vector):
        return apply_flat(
            lambda x: self.inverse_diagonal * x, vector, self.out_structure()
        )

    def transpose(self):
        return replace_fields(
            self,
            input_structure=self.output_structure,
            output_structure=self.input_structure,
        )


@diagonal.register(JacobiPreconditioner)
def _(operator):
    return operator.inverse_diagonal


is_cacheable.register(JacobiPreconditioner)(concrete_arrays)
reads_every_leaf.register(JacobiPreconditioner)(lambda p: True)
