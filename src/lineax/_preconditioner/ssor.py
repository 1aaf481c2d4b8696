"""`SSORPreconditioner`: symmetric successive over-relaxation (symmetric
Gauss–Seidel when `omega = 1`)."""

from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jaxtyping import Array, Inexact, Scalar

from .._misc import result_dtype, Static
from .._operator.base import (
    AbstractLinearOperator,
    concrete_arrays,
    holds_values,
    is_cacheable,
    reads_every_leaf,
)
from .._operator.sparse import SparseLinearOperator
from .._operator.tagged import unwrap_tagged
from .base import (
    AbstractPreconditioner,
    apply_flat,
    check_square,
    concrete_number,
    definite_tags,
    replace_fields,
)


class SSORPreconditioner(AbstractPreconditioner):
    """The SSOR preconditioner. With `A = D + L + U` (diagonal, strictly lower and
    strictly upper parts of the matrix),

    `P = (2 - ω)/ω · (D/ω + U)⁻¹ (D/ω) (D/ω + L)⁻¹`,

    the inverse of the SSOR splitting matrix (Saad, "Iterative Methods for Sparse
    Linear Systems", 2nd ed., §10.2). `ω = 1` is symmetric Gauss–Seidel. Each
    application is a forward and a backward triangular solve.

    For a symmetric `A`, `U = Lᵀ` and `P` is symmetric; for a symmetric positive
    (negative) definite `A` and `0 < ω < 2` it is positive (negative) definite, and
    so tagged. `Pᵀ` is the SSOR preconditioner of `Aᵀ`.

    The operator must hold its matrix (a matrix or PyTree operator; pass
    `lx.materialise(operator)` for a small matrix-free one), and its diagonal must
    have no zeros (the triangular solves would divide by them).

    **Arguments:**

    - `operator`: a square linear operator.
    - `omega`: the relaxation parameter, `0 < omega < 2`. Checked where it is
        concrete; a traced one (under `jit`, `grad`, `vmap`) is not, and outside
        `(0, 2)` shows as [`lineax.RESULTS.breakdown`][] of the solve (see
        "Failures" in the documentation).
    """

    lower: Inexact[Array, "size size"]
    upper: Inexact[Array, "size size"]
    scaled_diagonal: Inexact[Array, " size"]
    omega: Scalar
    input_structure: Static = eqx.field(static=True)
    output_structure: Static = eqx.field(static=True)
    tags: frozenset = eqx.field(static=True)

    def __init__(self, operator: AbstractLinearOperator, omega: Any = 1.0):
        check_square(operator, "SSORPreconditioner")
        if isinstance(unwrap_tagged(operator), SparseLinearOperator):
            raise ValueError(
                "`SSORPreconditioner` works with the dense matrix (its triangular "
                "solves are dense), so it does not take a `SparseLinearOperator`. "
                "Use `lx.ILUPreconditioner` or `lx.IncompleteCholeskyPreconditioner` "
                "(the sparse factorisations), `lx.BlockJacobiPreconditioner`, or "
                "pass `lx.MatrixLinearOperator(operator.as_matrix(), operator.tags)` "
                "if it is small."
            )
        if not holds_values(operator):
            raise ValueError(
                "`SSORPreconditioner` needs the matrix of the operator, but "
                f"{type(operator).__name__} is matrix-free. Pass "
                "`lx.materialise(operator)` if it is small enough to materialise, or "
                "use a polynomial preconditioner instead."
            )
        if not isinstance(omega, jax.core.Tracer):
            # NumPy, not `jnp`: under `jit` a `jnp` array of a Python float is
            # traced, and `float` of it fails.
            value = concrete_number(omega, "omega")
            if value.imag or not 0 < value.real < 2:
                raise ValueError(
                    f"`omega` must be a real number in (0, 2), got {omega!r}."
                )
        dtype = result_dtype(operator.in_structure(), operator.out_structure())
        matrix = operator.as_matrix().astype(dtype)
        omega = jnp.asarray(omega, dtype)
        scaled_diagonal = jnp.diagonal(matrix) / omega
        self.lower = jnp.tril(matrix, -1) + jnp.diag(scaled_diagonal)
        self.upper = jnp.triu(matrix, 1) + jnp.diag(scaled_diagonal)
        self.scaled_diagonal = scaled_diagonal
        self.omega = omega
        self.input_structure = Static(operator.out_structure())
        self.output_structure = Static(operator.in_structure())
        self.tags = definite_tags(operator)

    def mv(self, vector):
        def apply(v: Array) -> Array:
            y = jsl.solve_triangular(self.lower, v, lower=True)
            y = self.scaled_diagonal * y
            z = jsl.solve_triangular(self.upper, y, lower=False)
            return (2 - self.omega) / self.omega * z

        return apply_flat(apply, vector, self.out_structure())

    def transpose(self):
        # Pᵀ = (2 - ω)/ω (D/ω + Lᵀ)⁻¹ (D/ω) (D/ω + Uᵀ)⁻¹: the SSOR of Aᵀ.
        return replace_fields(
            self,
            lower=self.upper.T,
            upper=self.lower.T,
            input_structure=self.output_structure,
            output_structure=self.input_structure,
        )


is_cacheable.register(SSORPreconditioner)(concrete_arrays)
reads_every_leaf.register(SSORPreconditioner)(lambda p: True)
