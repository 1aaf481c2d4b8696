"""`MultigridPreconditioner`: one geometric multigrid V-cycle, for operators given
as a stencil on a regular 2-D or 3-D grid.

The grid hierarchy is vertex-centred with the unknowns at interior points: a grid
of `N` points along an axis coarsens to `N // 2` points, coarse point `j` sitting
on fine point `2j + 1`, with the (Dirichlet) boundary one spacing beyond the ends.
For odd `N` the domains of all levels coincide exactly (the textbook setting of
Briggs, Henson and McCormick, "A Multigrid Tutorial", 2nd ed., ch. 3); for even `N`
the coarse domain overhangs the fine one by one fine spacing at the far end, which
costs a little convergence and nothing else.

Prolongation is (bi/tri)linear interpolation `P`, and restriction is full
weighting `R = Pᵀ / 2ᵈ`; because `R ∝ Pᵀ` and the pre- and post-smoothing are the
same, the V-cycle is a symmetric operator for a symmetric stencil, as CG needs. The
coarse operators are the stencil rediscretised at spacing `2h`, `4h`, ... (for the
5-point Laplacian this equals the Galerkin product `R A P`).
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.scipy.linalg as jsl
import numpy as np
from jaxtyping import Array

from .._misc import default_floating_dtype, Static
from .._operator.function import closure_converted
from .._tags import (
    as_tags,
    negative_semidefinite_tag,
    positive_semidefinite_tag,
    symmetric_tag,
)
from .base import (
    AbstractPreconditioner,
    concrete_number,
    lanczos_extremes,
    replace_fields,
)


_SMOOTHERS = ("jacobi", "chebyshev")


def _restrict_axis(fine: Array, axis: int) -> Array:
    """Full weighting along `axis`: `c[j] = (f[2j] + 2 f[2j+1] + f[2j+2]) / 4`."""
    fine = jnp.moveaxis(fine, axis, 0)
    n = fine.shape[0]
    m = n // 2
    pad = [(0, 2 * m + 2 - n)] + [(0, 0)] * (fine.ndim - 1)
    fine = jnp.pad(fine, pad)
    coarse = (fine[0 : 2 * m : 2] + 2 * fine[1 : 2 * m + 1 : 2] + fine[2::2]) / 4
    return jnp.moveaxis(coarse, 0, axis)


def _prolong_axis(coarse: Array, axis: int, n: int) -> Array:
    """Linear interpolation along `axis` onto `n` fine points: `f[2j+1] = c[j]`,
    `f[2j] = (c[j-1] + c[j]) / 2`, with zero (boundary) values beyond the ends."""
    coarse = jnp.moveaxis(coarse, axis, 0)
    m = coarse.shape[0]
    padded = jnp.pad(coarse, [(1, 1)] + [(0, 0)] * (coarse.ndim - 1))
    even = (padded[:-1] + padded[1:]) / 2  # f[0], f[2], ..., f[2m]
    fine = jnp.stack([even[:m], coarse], axis=1).reshape((2 * m,) + coarse.shape[1:])
    if n == 2 * m + 1:
        fine = jnp.concatenate([fine, even[m:]], axis=0)
    return jnp.moveaxis(fine, 0, axis)


def _restrict(fine: Array) -> Array:
    for axis in range(fine.ndim):
        fine = _restrict_axis(fine, axis)
    return fine


def _prolong(coarse: Array, shape: tuple[int, ...]) -> Array:
    for axis, n in enumerate(shape):
        coarse = _prolong_axis(coarse, axis, n)
    return coarse


def _probe_stencil_diagonal(
    apply: Callable[[Array], Array], shape: tuple[int, ...], radius: int, dtype: Any
) -> Array:
    """The diagonal of a stencil operator of the given radius, exactly, from
    `(2 radius + 1)ᵈ` products: probe `c` is one on the points whose indices are
    `≡ c (mod 2 radius + 1)` along every axis, and two such points are farther apart
    than the stencil reaches."""
    period = 2 * radius + 1
    index = np.indices(shape) % period
    colours = np.indices((period,) * len(shape)).reshape(len(shape), -1).T
    probes = np.stack(
        [np.all(index == c.reshape((-1,) + (1,) * len(shape)), axis=0) for c in colours]
    ).astype(np.dtype(dtype))
    probes = jnp.asarray(probes)
    return jnp.sum(probes * jax.vmap(apply)(probes), axis=0)


def _shape_checked(
    apply: Callable[[Array], Array], shape: tuple[int, ...], h: Any
) -> Callable[[Array], Array]:
    """`apply` (a level's stencil, `u -> stencil(u, h)`), raising a ValueError that
    says what is wrong where it returns anything but an array of `u`'s shape
    `shape` (tested on the shapes, as traced under `vmap` too). A stencil that
    changes the grid's shape, e.g. one returning only the points it can reach,
    failed deep in JAX with "cannot reshape array of shape (225, 14, 15) ...
    into shape (225, 225)"."""

    def checked(u: Array) -> Array:
        out = apply(u)
        if not isinstance(out, jax.Array) or out.shape != shape:
            got = out.shape if isinstance(out, jax.Array) else type(out).__name__
            raise ValueError(
                f"`stencil(u, h)` must return an array of the shape of `u`, "
                f"but for `u` of shape {shape} (spacing {h}) it returned "
                f"{got}: the stencil maps the grid of unknowns to itself, with "
                "zero boundary values understood outside it (pad `u`, e.g. "
                "with `jnp.pad(u, 1)`, to reach them)."
            )
        return out

    return checked


def _checked_spacing(h: Any) -> float:
    value = concrete_number(h, "spacing")
    if value.imag or not value.real > 0:
        raise ValueError(f"`spacing` must be a positive real number, got {h!r}.")
    return value.real


class MultigridPreconditioner(AbstractPreconditioner):
    """One geometric multigrid V-cycle, as a preconditioner for an operator given by
    a stencil on a regular 2-D or 3-D grid (or 1-D).

    The operator is `u ↦ stencil(u, h)`, with `u` an array of shape `grid_shape`
    holding the unknowns at the interior points of a grid of spacing `h`, and zero
    (Dirichlet) boundary values understood outside it; the stencil is called again
    at spacings `2h`, `4h`, ... to build the coarse operators. For example the
    5-point Laplacian is

    ```python
    def laplacian(u, h):
        padded = jnp.pad(u, 1)
        return (4 * u - padded[:-2, 1:-1] - padded[2:, 1:-1]
                - padded[1:-1, :-2] - padded[1:-1, 2:]) / h**2
    ```

    and `lx.FunctionLinearOperator(lambda u: laplacian(u, h), struct, tags)` the
    operator to precondition. Each level smooths with damped Jacobi or a
    Jacobi-preconditioned Chebyshev polynomial (the diagonal of each level is
    probed exactly from `(2 stencil_radius + 1)ᵈ` stencil applications at setup),
    restricts the residual by full weighting, corrects by (bi/tri)linear
    interpolation of the coarse correction, and solves the coarsest level by a
    dense LU factorised at setup.

    The V-cycle is symmetric for a symmetric stencil (the restriction is the
    scaled transpose of the interpolation, and the smoothing before and after is
    the same), and positive definite for a positive definite one with a
    convergent smoother; it carries the symmetric and definite `tags` given for
    the stencil. It is a fixed linear operator (no inner tolerance), so plain CG
    and GMRES accept it. Its transpose is the V-cycle of the transposed stencil.

    **Arguments:**

    - `stencil`: a function `stencil(u, h) -> Au`, linear in `u` (an array of
        shape `grid_shape` at the finest level, and of the coarse shapes below),
        with `h` the grid spacing: a float, or a tuple of floats (one per axis)
        if `spacing` is a tuple. It may close over arrays, traced ones included
        (a variable coefficient under `jax.jit`, `jax.grad` or `jax.vmap`).
    - `grid_shape`: the shape of the grid of unknowns at the finest level.
    - `spacing`: the finest grid spacing `h`, a float or a tuple of floats.
    - `dtype`: the dtype of the grid. Defaults to JAX's default float dtype.
    - `tags`: the tags of the stencil operator, e.g.
        [`lineax.positive_semidefinite_tag`][] for the negative Laplacian.
        Symmetry and definiteness carry over to the preconditioner.
    - `levels`: the number of grid levels, the finest included. `None` coarsens
        until the coarsest grid has at most `coarsest_size` points, or an axis
        has fewer than 4.
    - `coarsest_size`: see `levels`.
    - `smoother`: `"jacobi"` (damped Jacobi) or `"chebyshev"` (a Chebyshev
        polynomial in `D⁻¹A` damping the upper part `[λmax/10, 1.1 λmax]` of its
        spectrum, with `λmax` estimated per level by 10 Lanczos steps; needs a
        symmetric definite stencil).
    - `smoothing_steps`: the smoothing before and after the coarse correction on
        each level: Jacobi sweeps, or the degree of the Chebyshev polynomial.
    - `omega`: the damping of Jacobi. Defaults to `4/5` in 2-D and `6/7` in 3-D
        (optimal for the Laplacian), `2/3` in 1-D.
    - `stencil_radius`: how many points the stencil reaches along each axis
        (1 for the 5- and 9-point stencils).
    """

    stencil: Callable = eqx.field(static=True)
    # The stencil at each level, closure-converted, if it closes over traced
    # arrays (else `None`): see `__init__`.
    level_stencils: tuple[Callable, ...] | None
    shapes: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    spacings: tuple[Any, ...] = eqx.field(static=True)
    inverse_diagonals: tuple[Array, ...]
    smoother_bounds: tuple[tuple[Array, Array], ...]
    coarse_lu: Array
    coarse_pivots: Array
    smoother: str = eqx.field(static=True)
    smoothing_steps: int = eqx.field(static=True)
    omega: float = eqx.field(static=True)
    transposed: bool = eqx.field(static=True)
    input_structure: Static = eqx.field(static=True)
    output_structure: Static = eqx.field(static=True)
    tags: frozenset = eqx.field(static=True)

    def __init__(
        self,
        stencil: Callable[[Array, Any], Array],
        grid_shape: tuple[int, ...],
        spacing: Any = 1.0,
        *,
        dtype: Any = None,
        tags: Any = (),
        levels: int | None = None,
        coarsest_size: int = 256,
        smoother: str = "jacobi",
        smoothing_steps: int = 2,
        omega: float | None = None,
        stencil_radius: int = 1,
    ):
        if not callable(stencil):
            raise TypeError(
                f"`stencil` must be callable, got {type(stencil).__name__}."
            )
        try:
            grid_shape = tuple(int(n) for n in grid_shape)
        except TypeError:
            raise TypeError(
                f"`grid_shape` must be a tuple of ints, got {grid_shape!r}."
            ) from None
        if not grid_shape or any(n < 1 for n in grid_shape):
            raise ValueError(
                f"`grid_shape` must be a non-empty tuple of positive ints, got "
                f"{grid_shape!r}."
            )
        ndim = len(grid_shape)
        if isinstance(spacing, (tuple, list)):
            if len(spacing) != ndim:
                raise ValueError(
                    f"`spacing` has {len(spacing)} entries but `grid_shape` has "
                    f"{ndim} axes."
                )
            spacing = tuple(_checked_spacing(h) for h in spacing)
        else:
            spacing = _checked_spacing(spacing)
        if smoother not in _SMOOTHERS:
            raise ValueError(
                f"`smoother` must be one of {_SMOOTHERS}, got {smoother!r}."
            )
        for name, value, least in (
            ("smoothing_steps", smoothing_steps, 1),
            ("stencil_radius", stencil_radius, 1),
            ("coarsest_size", coarsest_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        tags = as_tags(tags)
        if smoother == "chebyshev" and not (
            symmetric_tag in tags
            or positive_semidefinite_tag in tags
            or negative_semidefinite_tag in tags
        ):
            raise ValueError(
                "`smoother='chebyshev'` needs a symmetric definite stencil: pass "
                "`tags=lx.positive_semidefinite_tag` (or negative), or use "
                "`smoother='jacobi'`."
            )
        if omega is None:
            omega = {1: 2 / 3, 2: 4 / 5}.get(ndim, 6 / 7)
        if not 0 < omega < 2:
            raise ValueError(f"`omega` must lie in (0, 2), got {omega!r}.")
        dtype = default_floating_dtype() if dtype is None else jnp.dtype(dtype)

        shapes = [grid_shape]
        if levels is None:
            while np.prod(shapes[-1]) > coarsest_size and min(shapes[-1]) >= 4:
                shapes.append(tuple(n // 2 for n in shapes[-1]))
        else:
            if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
                raise ValueError(f"`levels` must be a positive int, got {levels!r}.")
            for _ in range(levels - 1):
                if min(shapes[-1]) < 2:
                    raise ValueError(
                        f"`levels={levels}` coarsens `grid_shape={grid_shape}` to "
                        "an empty grid; use fewer levels."
                    )
                shapes.append(tuple(n // 2 for n in shapes[-1]))
        spacings = [spacing]
        for _ in shapes[1:]:
            h = spacings[-1]
            spacings.append(tuple(2 * x for x in h) if isinstance(h, tuple) else 2 * h)

        self.stencil = stencil
        self.shapes = tuple(shapes)
        self.spacings = tuple(spacings)
        # A stencil closing over a traced array (a coefficient under `jit`, `grad`
        # or `vmap`) leaked it when the V-cycle was traced inside the solve ("No
        # constant handler for type DynamicJaxprTracer"). Such a stencil is
        # closure-converted at each level's shape, so that the arrays become leaves
        # of the preconditioner; any other is kept as is (a static field, so that
        # preconditioners of one stencil compare equal and share compilations).
        self.level_stencils = None
        raw = [self._stencil_at(level) for level in range(len(shapes))]
        converted = tuple(
            closure_converted(fn, False, jax.ShapeDtypeStruct(shape, dtype))
            for fn, shape in zip(raw, shapes)
        )
        if any(c is not r for c, r in zip(converted, raw)):
            self.level_stencils = converted
        self.smoother = smoother
        self.smoothing_steps = smoothing_steps
        self.omega = float(omega)
        self.transposed = False
        struct = jax.ShapeDtypeStruct(grid_shape, dtype)
        self.input_structure = Static(struct)
        self.output_structure = Static(struct)
        self.tags = frozenset(
            tags & {symmetric_tag, positive_semidefinite_tag, negative_semidefinite_tag}
        )

        inverse_diagonals = []
        bounds = []
        # (Every level's stencil is applied here, each through `_shape_checked`.)
        for level, shape in enumerate(shapes[:-1]):
            apply = _shape_checked(self._stencil_at(level), shape, spacings[level])
            diag = _probe_stencil_diagonal(apply, shape, stencil_radius, dtype)
            inverse_diagonals.append(1 / diag)
            if smoother == "chebyshev":
                bounds.append(self._smoother_interval(apply, diag, shape, dtype))
        self.inverse_diagonals = tuple(inverse_diagonals)
        self.smoother_bounds = tuple(bounds)

        # The coarsest operator, materialised column by column and factorised once.
        coarse_shape = shapes[-1]
        size = int(np.prod(coarse_shape))
        apply = _shape_checked(
            self._stencil_at(len(shapes) - 1), coarse_shape, spacings[-1]
        )
        basis = jnp.eye(size, dtype=dtype).reshape((size,) + coarse_shape)
        columns = jax.vmap(apply)(basis).reshape(size, size)
        self.coarse_lu, self.coarse_pivots = jsl.lu_factor(columns.T)

    def _stencil_at(self, level: int) -> Callable[[Array], Array]:
        if self.level_stencils is not None:
            return self.level_stencils[level]
        h = self.spacings[level]
        stencil = self.stencil
        return lambda u: stencil(u, h)

    @staticmethod
    def _smoother_interval(apply, diag, shape, dtype) -> tuple[Array, Array]:
        # The spectrum of D⁻¹A is that of the symmetric D^{-1/2} A D^{-1/2}.
        scale = jnp.sqrt(jnp.abs(1 / diag)).reshape(-1)

        def mv(x):
            return scale * apply((scale * x).reshape(shape)).reshape(-1)

        lo, hi = lanczos_extremes(mv, scale.shape[0], dtype, 10, jr.key(0))
        # Negative definite: the spectrum is negative, and so is the interval.
        top = jax.lax.stop_gradient(jnp.where(jnp.abs(hi) >= jnp.abs(lo), hi, lo))
        top = top * jnp.sign(jnp.real(diag.reshape(-1)[0]))
        return top / 10 * 1.1, top * 1.1

    def _operator_at(self, level: int) -> Callable[[Array], Array]:
        apply = self._stencil_at(level)
        if not self.transposed:
            return apply
        struct = jax.ShapeDtypeStruct(self.shapes[level], self.coarse_lu.dtype)
        transpose = jax.linear_transpose(apply, struct)
        return lambda u: transpose(u)[0]

    def _smooth(self, level: int, x: Array | None, b: Array) -> Array:
        apply = self._operator_at(level)
        dinv = self.inverse_diagonals[level]
        if self.smoother == "jacobi":
            steps = self.smoothing_steps
            if x is None:  # from zero the first sweep needs no product
                x = self.omega * dinv * b
                steps -= 1
            for _ in range(steps):
                x = x + self.omega * dinv * (b - apply(x))
            return x
        # Jacobi-preconditioned Chebyshev iteration on [lo, hi] (Saad, Algorithm
        # 12.1, with z = D⁻¹r in place of r).
        lo, hi = self.smoother_bounds[level]
        theta, delta = (hi + lo) / 2, (hi - lo) / 2
        sigma = theta / delta
        r = b if x is None else b - apply(x)
        x = jnp.zeros_like(b) if x is None else x
        d = dinv * r / theta
        rho = 1 / sigma
        for k in range(self.smoothing_steps):
            x = x + d
            if k == self.smoothing_steps - 1:
                break
            r = r - apply(d)
            rho_next = 1 / (2 * sigma - rho)
            d = rho_next * rho * d + (2 * rho_next / delta) * (dinv * r)
            rho = rho_next
        return x

    def _cycle(self, level: int, b: Array) -> Array:
        if level == len(self.shapes) - 1:
            trans = 1 if self.transposed else 0
            x = jsl.lu_solve((self.coarse_lu, self.coarse_pivots), b.reshape(-1), trans)
            return x.reshape(b.shape)
        x = self._smooth(level, None, b)
        residual = b - self._operator_at(level)(x)
        correction = self._cycle(level + 1, _restrict(residual))
        x = x + _prolong(correction, self.shapes[level])
        return self._smooth(level, x, b)

    def mv(self, vector):
        return self._cycle(0, vector)

    def transpose(self):
        if symmetric_tag in self.tags:
            return self
        definite = self.tags & {positive_semidefinite_tag, negative_semidefinite_tag}
        # A definite complex stencil is Hermitian, not symmetric: its V-cycle's
        # transpose is its conjugate, the V-cycle of the transposed stencil.
        # (Returned as is, `P.T` was `P = conj(Pᵀ)`: off by 84% of its largest
        # entry for a 1-D magnetic Laplacian.)
        if definite and not jnp.iscomplexobj(self.coarse_lu):
            return self
        return replace_fields(self, transposed=not self.transposed)
