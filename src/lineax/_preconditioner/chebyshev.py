"""`ChebyshevPreconditioner`: the Chebyshev polynomial approximation of `A⁻¹` on an
interval holding the spectrum."""

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
from .._tags import negative_semidefinite_tag, positive_semidefinite_tag
from .base import (
    AbstractPolynomialPreconditioner,
    apply_flat,
    concrete_number,
    definite_tags,
    flat_mv,
    init_polynomial,
    spectrum_interval,
)


def _checked_interval(interval: Any, dtype: Any) -> tuple[Array, Array]:
    try:
        lo, hi = interval
    except (TypeError, ValueError):
        raise ValueError(
            f"`interval` must be None or a pair `(lo, hi)`, got {interval!r}."
        ) from None
    concrete = not any(isinstance(x, jax.core.Tracer) for x in (lo, hi))
    if concrete:
        lo_, hi_ = concrete_number(lo, "interval"), concrete_number(hi, "interval")
        if lo_.imag or hi_.imag or not (np.isfinite(lo_) and np.isfinite(hi_)):
            raise ValueError(
                "`interval` must be a pair of finite real numbers (bounds of the "
                f"operator's real spectrum), got {interval!r}."
            )
        lo_, hi_ = lo_.real, hi_.real
        if not lo_ < hi_:
            raise ValueError(f"`interval` must have lo < hi, got {interval!r}.")
        if lo_ <= 0 <= hi_:
            raise ValueError(
                f"`interval` {interval!r} contains zero: a polynomial approximation "
                "of 1/λ needs an interval on one side of zero (the operator must be "
                "definite, and the interval bound its eigenvalues away from zero)."
            )
    lo, hi = jnp.asarray(lo, dtype), jnp.asarray(hi, dtype)
    if not concrete:
        bad = (jnp.real(lo) >= jnp.real(hi)) | (jnp.real(lo) * jnp.real(hi) <= 0)
        lo = eqx.error_if(
            lo, bad, "ChebyshevPreconditioner: `interval` contains zero or is empty."
        )
    return lo, hi


class ChebyshevPreconditioner(AbstractPolynomialPreconditioner):
    """The Chebyshev polynomial preconditioner: the polynomial `p` of degree
    `degree` minimising `max |1 - λ p(λ)|` over an interval `[lo, hi]` holding the
    spectrum of `A`, applied as `degree` steps of Chebyshev iteration from zero
    (Saad, "Iterative Methods for Sparse Linear Systems", 2nd ed., Algorithm 12.1).

    `1 - λ p(λ) = T_{d+1}((θ - λ)/δ) / T_{d+1}(θ/δ)` with `θ, δ` the interval's centre
    and half-width, which is smaller than one in magnitude on the interval, so `p`
    is positive there (and on `(0, lo)`) and `P` is positive definite for a positive
    definite `A` whose largest eigenvalue is at most `hi`; it is so tagged. The
    same holds with signs flipped for a negative definite `A` and interval.

    Each application costs `degree` matrix-vector products with `A` and a few
    vector updates: matrix-free, and as parallel as `A`'s `mv`.

    **Arguments:**

    - `operator`: a square operator `A` whose input and output structures are
        equal.
    - `degree`: the degree of the polynomial (`0` gives `P = I/θ`).
    - `interval`: `(lo, hi)`, bounds of the spectrum, both positive or both
        negative. An interval containing zero is a `ValueError` (when given as
        concrete numbers; a traced one is checked at run time). `None` estimates
        it by `lanczos_steps` steps of Lanczos, for a symmetric definite operator:
        the Ritz values, with the end of largest magnitude enlarged by 10%.
    - `lanczos_steps`: the number of Lanczos steps of the estimate.
    - `key`: the random key of Lanczos' starting vector. Defaults to
        `jax.random.key(0)`.
    """

    operator: AbstractLinearOperator
    lower: Scalar
    upper: Scalar
    degree: int = eqx.field(static=True)
    input_structure: Static = eqx.field(static=True)
    output_structure: Static = eqx.field(static=True)
    tags: frozenset = eqx.field(static=True)

    def __init__(
        self,
        operator: AbstractLinearOperator,
        degree: SupportsIndex,
        interval: Any = None,
        *,
        lanczos_steps: SupportsIndex = 20,
        key: PRNGKeyArray | None = None,
    ):
        dtype = init_polynomial(self, operator, degree)
        if interval is None:
            lo, hi = spectrum_interval(
                operator,
                lanczos_steps,
                key,
                0.1,
                "ChebyshevPreconditioner",
                "interval",
            )
            lo, hi = lo.astype(dtype), hi.astype(dtype)
        else:
            lo, hi = _checked_interval(interval, dtype)
        tags = definite_tags(operator)
        # Definite only if the interval lies on the operator's side of zero.
        if not isinstance(lo, jax.core.Tracer):
            if is_positive_semidefinite(operator) and float(np.real(lo)) < 0:
                tags = tags - {positive_semidefinite_tag}
            if is_negative_semidefinite(operator) and float(np.real(hi)) > 0:
                tags = tags - {negative_semidefinite_tag}
        self.lower = lo
        self.upper = hi
        self.tags = tags

    # Un-jitted, the loop was traced and compiled again at every call (0.1-0.2 s):
    # see `jit_when_eager`.
    @jit_when_eager
    def mv(self, vector):
        mv = flat_mv(self.operator)
        theta = (self.upper + self.lower) / 2
        delta = (self.upper - self.lower) / 2
        sigma = theta / delta

        def apply(v: Array) -> Array:
            # Named as in Saad's Algorithm 12.1: iterate x, residual r, direction
            # d, and ρₖ = T_k(σ)/T_{k+1}(σ).
            def step(_, carry):
                x, r, d, rho = carry
                r = r - mv(d)
                rho_next = 1 / (2 * sigma - rho)
                d = rho_next * rho * d + (2 * rho_next / delta) * r
                return x + d, r, d, rho_next

            d = v / theta
            init = (d, v, d, 1 / sigma)
            x, *_ = jax.lax.fori_loop(0, self.degree, step, init)
            return x

        return apply_flat(apply, vector, self.out_structure())
