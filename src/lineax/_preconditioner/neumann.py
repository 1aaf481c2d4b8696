"""`NeumannPreconditioner`: a truncated, scaled Neumann series for `A⁻¹`."""

from typing import Any, SupportsIndex

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray, Scalar

from .._misc import jit_when_eager, Static
from .._operator.base import (
    AbstractLinearOperator,
    is_negative_semidefinite,
    is_positive_semidefinite,
)
from .base import (
    AbstractPolynomialPreconditioner,
    apply_flat,
    concrete_number,
    definite_tags,
    flat_mv,
    init_polynomial,
    spectrum_interval,
)


class NeumannPreconditioner(AbstractPolynomialPreconditioner):
    """The truncated Neumann series `P = ω Σₖ₌₀ᵈ (I - ωA)ᵏ`, which tends to `A⁻¹`
    as the degree `d` grows when the spectrum of `ωA` lies in the disc
    `|1 - z| < 1`.

    Each application costs `degree` matrix-vector products with `A` (Horner's
    rule), and nothing else: it is matrix-free. For a symmetric positive definite
    `A` and `0 < ω λmax < 2`, `P` is symmetric positive definite, and so is
    tagged; the same holds with signs flipped for a negative definite `A`. The
    [`lineax.ChebyshevPreconditioner`][] of the same degree is never worse for
    definite operators (the Neumann polynomial is the Chebyshev one for the
    interval `(0, 2/ω)` collapsed onto its centre); the Neumann series is simpler
    and needs only one scale.

    **Arguments:**

    - `operator`: a square operator `A` whose input and output structures are
        equal.
    - `degree`: the degree `d` of the polynomial (`0` gives `P = ωI`).
    - `scale`: the scale `ω`. `None` (for a symmetric definite operator) takes
        `ω = 1/λmax`, with `λmax` estimated by a few steps of Lanczos (its
        magnitude enlarged by 5%), so that `ωA` has spectrum in `(0, 1)`. For any
        other operator give `ω`, such that `|1 - ωλ| < 1` over the spectrum.
        Checked (finite, nonzero, of the operator's definite sign) where it is
        concrete; a traced one (under `jit`, `grad`, `vmap`) is not, and a wrong
        one shows as [`lineax.RESULTS.breakdown`][] of the solve.
    - `lanczos_steps`: the number of Lanczos steps for the estimate of `λmax`.
    - `key`: the random key of Lanczos' starting vector. Defaults to
        `jax.random.key(0)`.
    """

    operator: AbstractLinearOperator
    scale: Scalar
    degree: int = eqx.field(static=True)
    input_structure: Static = eqx.field(static=True)
    output_structure: Static = eqx.field(static=True)
    tags: frozenset = eqx.field(static=True)

    def __init__(
        self,
        operator: AbstractLinearOperator,
        degree: SupportsIndex,
        scale: Any = None,
        *,
        lanczos_steps: SupportsIndex = 20,
        key: PRNGKeyArray | None = None,
    ):
        dtype = init_polynomial(self, operator, degree)
        positive = is_positive_semidefinite(operator)
        negative = (not positive) and is_negative_semidefinite(operator)
        if scale is None:
            lo, hi = spectrum_interval(
                operator, lanczos_steps, key, 0.05, "NeumannPreconditioner", "scale"
            )
            scale = 1 / (hi if positive else lo)
        elif not isinstance(scale, jax.core.Tracer):
            # NumPy, not `jnp`: under `jit` a `jnp` array of a Python float is
            # traced, and `complex` of it fails.
            value = concrete_number(scale, "scale")
            if not np.isfinite(value):
                raise ValueError(f"`scale` must be finite, got {scale!r}.")
            if value.imag and not jnp.issubdtype(dtype, jnp.complexfloating):
                raise ValueError(
                    f"`scale` {scale!r} is complex but the operator is real; the "
                    "preconditioner keeps the operator's dtype."
                )
            if value == 0 or (positive and value.real <= 0):
                raise ValueError(
                    "`scale` must be nonzero, and positive for a positive definite "
                    f"operator (so that |1 - scale λ| < 1 is possible), got {scale!r}."
                )
            if negative and value.real >= 0:
                raise ValueError(
                    "`scale` must be negative for a negative definite operator, got "
                    f"{scale!r}."
                )
        self.scale = jnp.asarray(scale, dtype=dtype)
        self.tags = definite_tags(operator)

    # Un-jitted, the loop was traced and compiled again at every call (0.1-0.2 s):
    # see `jit_when_eager`.
    @jit_when_eager
    def mv(self, vector):
        mv = flat_mv(self.operator)
        scale = self.scale

        def apply(v: Array) -> Array:
            sv = scale * v

            # y ← ωv + (I - ωA) y, `degree` times from y = ωv.
            def horner(_, y):
                return sv + y - scale * mv(y)

            return jax.lax.fori_loop(0, self.degree, horner, sv)

        return apply_flat(apply, vector, self.out_structure())
