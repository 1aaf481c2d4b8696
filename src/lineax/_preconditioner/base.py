"""`AbstractPreconditioner`, and what the preconditioners share.

A preconditioner of an operator `A` approximates `A⁻¹`: it is a linear operator from
`A`'s output space to `A`'s input space, passed to an iterative solver as
`options={"preconditioner": P}`. Each preconditioner is built once from `A` (its
setup: a diagonal, factorised blocks, an eigenvalue interval, a grid hierarchy) and
then applied once per solver step; building it is ordinary JAX code, so it works
under `jit`, `vmap` and `grad` like any other operator.

The contract every preconditioner here keeps:

- its input structure is `A`'s output structure and its output structure is `A`'s
  input structure (so `preconditioner_of` in `_solver/_krylov.py` accepts it);
- it claims a tag only when the tag holds for every operator it accepts (a
  positive definite `A` gives a positive definite Jacobi, polynomial or SSOR
  preconditioner, which is what CG, MINRES and the reverse-mode solve rely on);
- `transpose()` is the preconditioner of `Aᵀ` (the transposed solve of reverse
  mode uses the transposed preconditioner);
- it never materialises a matrix-free operator behind the user's back.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, SupportsIndex

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, PRNGKeyArray, PyTree

from .._misc import checked_count, jit_when_eager, result_dtype, Static
from .._norm import two_norm
from .._operator.base import (
    AbstractLinearOperator,
    check_operator,
    check_square as check_square_operator,
    check_structures_equal,
    concrete_arrays,
    flatten_vector,
    is_cacheable,
    is_negative_semidefinite,
    is_positive_semidefinite,
    is_symmetric,
    linearise,
    materialise,
    matrix_by_mv,
    reads_every_leaf,
    register_tag_predicates,
    unflatten_vector,
)
from .._tags import (
    negative_semidefinite_tag,
    positive_semidefinite_tag,
    symmetric_tag,
)


def concrete_number(value: Any, name: str) -> complex:
    """`value`, a Python or NumPy number or a 0-d array that is not traced, as a
    Python complex; a TypeError naming `name` for anything else (a string, a
    vector), instead of NumPy's message about converting it."""
    array = np.asarray(value) if not isinstance(value, (str, bytes)) else None
    if array is None or array.ndim != 0 or not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"`{name}` must be a number or a 0-d array, got {value!r}.")
    return complex(array)


def checked_key(key: Any) -> PRNGKeyArray:
    """The random key `key`, `jax.random.key(0)` for None; a TypeError for anything
    but a JAX array (an int seed fails deep inside `jax.random` otherwise)."""
    if key is None:
        return jr.key(0)
    if not isinstance(key, jax.Array):
        raise TypeError(
            f"`key` must be a JAX random key such as `jax.random.key(0)`, got "
            f"{type(key).__name__}: {key!r}."
        )
    return key


class AbstractPreconditioner(AbstractLinearOperator):
    """The base class of the preconditioners: linear operators approximating the
    inverse of an operator `A`, built from `A`.

    A preconditioner maps `A`'s output space to its input space, so its input
    structure is `A.out_structure()` and its output structure is `A.in_structure()`.
    Pass it to an iterative solver as `options={"preconditioner": P}`. Its tags say
    what holds for it (e.g. positive semidefinite when `A` is), which CG and MINRES
    rely on.
    """

    input_structure: eqx.AbstractVar[Static]
    output_structure: eqx.AbstractVar[Static]
    tags: eqx.AbstractVar[frozenset]

    # A preconditioner's tags are all that hold for it (it sets them from what it
    # knows of `A`): a missing definiteness tag means "not definite", so CG and
    # MINRES can refuse it at trace time. (An arbitrary user operator's missing tag
    # only means "not known".)
    complete_tags: ClassVar[bool] = True

    def in_structure(self):
        return self.input_structure.value

    def out_structure(self):
        return self.output_structure.value

    def as_matrix(self):
        # A preconditioner is defined by its action; its matrix is rarely wanted
        # (tests, small problems), so one batched `mv` over the identity suffices.
        return matrix_by_mv(self)


register_tag_predicates(AbstractPreconditioner)


class AbstractPolynomialPreconditioner(AbstractPreconditioner):
    """A preconditioner `p(A)`, a polynomial in the operator `A`, applied with
    `degree` matrix-vector products and nothing else: matrix-free, and as parallel
    as `A`'s own `mv`.

    `p(A)ᵀ = p(Aᵀ)`, so the transpose is the same polynomial in `A.transpose()`.
    """

    operator: eqx.AbstractVar[AbstractLinearOperator]
    degree: eqx.AbstractVar[int]

    def transpose(self):
        return replace_fields(
            self,
            operator=self.operator.transpose(),
            input_structure=self.output_structure,
            output_structure=self.input_structure,
        )


@materialise.register(AbstractPolynomialPreconditioner)
def _(preconditioner):
    return replace_fields(preconditioner, operator=materialise(preconditioner.operator))


@linearise.register(AbstractPolynomialPreconditioner)
def _(preconditioner):
    return replace_fields(preconditioner, operator=linearise(preconditioner.operator))


is_cacheable.register(AbstractPolynomialPreconditioner)(
    lambda p: is_cacheable(p.operator) and concrete_arrays(p)
)
reads_every_leaf.register(AbstractPolynomialPreconditioner)(
    lambda p: reads_every_leaf(p.operator)
)


def init_polynomial(
    preconditioner: AbstractPolynomialPreconditioner,
    operator: Any,
    degree: Any,
) -> Any:
    """The start of a polynomial preconditioner's `__init__`: check that
    `operator` is square with equal input and output structures, and `degree`;
    set the fields every polynomial preconditioner has (`operator`, `degree` and
    the structures). Returns the dtype of the operator's input."""
    who = type(preconditioner).__name__
    check_square(operator, who)
    check_same_structures(operator, who)
    preconditioner.degree = checked_count(degree, "degree", 0)
    preconditioner.operator = operator
    preconditioner.input_structure = Static(operator.out_structure())
    preconditioner.output_structure = Static(operator.in_structure())
    return result_dtype(operator.in_structure())


def spectrum_interval(
    operator: AbstractLinearOperator,
    steps: SupportsIndex,
    key: PRNGKeyArray | None,
    margin: float,
    who: str,
    argument: str,
) -> tuple[Array, Array]:
    """An interval `(lo, hi)` holding the spectrum of a symmetric definite operator,
    from `steps` steps of Lanczos; the end of largest magnitude is pushed out by
    `margin` (relative), since Ritz values are inner bounds and a polynomial
    preconditioner tuned to too short an interval stops being definite beyond it.

    The interval is a heuristic choice of polynomial, not a function to
    differentiate: its gradient is stopped.
    """
    positive = is_positive_semidefinite(operator)
    if not (
        is_symmetric(operator) and (positive or is_negative_semidefinite(operator))
    ):
        raise ValueError(
            f"`{who}` estimates the spectrum of the operator by Lanczos, which needs "
            "a symmetric positive or negative definite operator (tag it "
            "`lx.positive_semidefinite_tag` or `lx.negative_semidefinite_tag`); for "
            f"any other operator pass `{argument}` explicitly."
        )
    steps = checked_count(steps, "lanczos_steps", 1)
    key = checked_key(key)
    lo, hi = jax.lax.stop_gradient(_operator_extremes(operator, steps, key))
    if positive:
        return lo, hi * (1 + margin)
    return lo * (1 + margin), hi


# Called un-jitted, as a constructor usually is, the Lanczos loop was traced and
# compiled anew for every preconditioner built (0.5-1 s each, CPU), since `flat_mv`
# makes a new closure each time: see `jit_when_eager`.
@jit_when_eager
def _operator_extremes(
    operator: AbstractLinearOperator, steps: int, key: PRNGKeyArray
) -> tuple[Array, Array]:
    dtype = result_dtype(operator.in_structure())
    if operator.in_size() == 0:
        # No spectrum, and no vector to start Lanczos from: any interval will do.
        one = jnp.ones((), jnp.finfo(dtype).dtype)
        return one, one
    return lanczos_extremes(flat_mv(operator), operator.in_size(), dtype, steps, key)


def replace_fields(module: eqx.Module, **changes: Any) -> Any:
    """A copy of `module` with some fields replaced, without calling `__init__`.

    The preconditioners' `__init__` does the setup from an operator; their
    `transpose` rearranges the result of that setup instead (the same factors, the
    structures swapped), which is what Equinox's own unflattening does too.
    """
    new = object.__new__(type(module))
    for field in dataclasses.fields(module):
        value = changes.pop(field.name, getattr(module, field.name))
        object.__setattr__(new, field.name, value)
    if changes:
        raise TypeError(f"Unknown fields {sorted(changes)}.")
    return new


def definite_tags(operator: AbstractLinearOperator) -> frozenset:
    """The definiteness (and symmetry) tags of `operator`, which an approximate
    inverse built from it keeps."""
    tags = set()
    if is_symmetric(operator):
        tags.add(symmetric_tag)
    if is_positive_semidefinite(operator):
        tags.add(positive_semidefinite_tag)
    if is_negative_semidefinite(operator):
        tags.add(negative_semidefinite_tag)
    return frozenset(tags)


def usable_pivots(diagonal: Array, positive: bool, negative: bool) -> Array:
    """Where the pivots (or diagonal entries) of an approximate inverse can be
    divided by: of the sign the operator's definiteness tag promises (real part
    positive, or negative), else nonzero."""
    if positive:
        return jnp.real(diagonal) > 0
    if negative:
        return jnp.real(diagonal) < 0
    return diagonal != 0


def check_square(operator: Any, who: str) -> AbstractLinearOperator:
    """Check that `operator` is a square linear operator; return it."""
    check_operator(operator, who=who)
    check_square_operator(operator, who)
    return operator


def check_same_structures(operator: AbstractLinearOperator, who: str) -> None:
    """Polynomials in `A` need `A` to map its input space to itself."""
    check_structures_equal(
        operator.in_structure(),
        operator.out_structure(),
        f"`{who}` evaluates a polynomial in `operator`, so the operator's input and "
        "output structures must be equal",
    )


def flat_mv(operator: AbstractLinearOperator) -> Callable[[Array], Array]:
    """`operator.mv` on flattened 1-D vectors (in PyTree-leaf order)."""
    in_struct = operator.in_structure()
    dtype = result_dtype(in_struct, operator.out_structure())

    def mv(x: Array) -> Array:
        return flatten_vector(operator.mv(unflatten_vector(x, in_struct, True)), dtype)

    return mv


def apply_flat(
    fn: Callable[[Array], Array],
    vector: PyTree[ArrayLike],
    out_struct: PyTree[jax.ShapeDtypeStruct],
) -> PyTree[Array]:
    """Apply `fn`, a map of flat vectors, to a PyTree vector, giving a PyTree vector
    with structure `out_struct` (of the same size: a preconditioner is square)."""
    flat = flatten_vector(vector)
    size = sum(int(np.prod(x.shape)) for x in jtu.tree_leaves(out_struct))
    if flat.shape != (size,):
        # (An elementwise `fn` would broadcast a vector of size one silently.)
        raise ValueError(
            f"The preconditioner acts on vectors of {size} elements, got a vector "
            f"of {flat.size} ({jtu.tree_map(jnp.shape, vector)})."
        )
    return unflatten_vector(fn(flat), out_struct, keep_dtype=True)


#
# A few steps of Lanczos, for the extreme eigenvalues of a symmetric operator.
#


def lanczos_extremes(
    mv: Callable[[Array], Array],
    size: int,
    dtype: Any,
    steps: int,
    key: PRNGKeyArray,
) -> tuple[Array, Array]:
    """Estimates `(λmin, λmax)` of a symmetric (Hermitian) operator from `steps`
    steps of Lanczos with full reorthogonalisation, started from a random vector.

    The Ritz values lie inside the spectrum, so the estimates are inner bounds:
    `λmax` is usually accurate to a few percent after 10-20 steps, `λmin` much less
    so. If the Krylov space becomes invariant (at most `size` steps, or a starting
    vector in an invariant subspace), the later steps are masked out rather than
    contributing a spurious zero eigenvalue.
    """
    steps = min(steps, size)
    real_dtype = jnp.finfo(dtype).dtype
    q0 = jr.normal(key, (size,), real_dtype).astype(dtype)
    q0 = q0 / jnp.linalg.norm(q0)
    eps = jnp.finfo(dtype).eps

    # (HIGHEST: on a GPU a float32 product defaults to TF32, 10 bits, which loses
    # the orthogonality the reorthogonalisation is there to keep.)
    highest = jax.lax.Precision.HIGHEST

    def orthogonalised(w, basis):
        coefficients = jnp.matmul(jnp.conj(basis), w, precision=highest)
        return w - jnp.matmul(basis.T, coefficients, precision=highest)

    def step(carry, j):
        basis, q, q_prev, beta_prev, alive = carry
        basis = basis.at[j].set(q)
        w = mv(q)
        alpha = jnp.real(jnp.vdot(q, w, precision=highest))
        w = w - alpha * q - beta_prev * q_prev
        # Full reorthogonalisation, twice ("twice is enough", Parlett): cheap at
        # this size, and it keeps ghost copies of converged Ritz values away.
        w = orthogonalised(orthogonalised(w, basis), basis)
        # (Overflow-safe: `sqrt(<w, w>)` was infinite for a float32 operator of
        # norm 2e19, and the polynomial preconditioners built on it NaN.)
        beta = two_norm(w)
        alive_next = alive & (beta > 100 * eps * (jnp.abs(alpha) + beta_prev))
        q_next = jnp.where(alive_next, w / jnp.where(beta > 0, beta, 1), 0)
        return (basis, q_next, q, jnp.where(alive_next, beta, 0), alive_next), (
            alpha,
            beta,
            alive,
        )

    init = (
        jnp.zeros((steps, size), dtype),
        q0,
        jnp.zeros_like(q0),
        jnp.zeros((), real_dtype),
        jnp.array(True),
    )
    _, (alphas, betas, alive) = jax.lax.scan(step, init, np.arange(steps))
    # Steps after a breakdown repeat a Ritz value already found (alpha_0 lies in
    # the spectrum), so they move neither extreme.
    alphas = jnp.where(alive, alphas, alphas[0])
    off = jnp.where(alive[1:], betas[:-1], 0)
    tridiag = jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)
    # (In units of its largest entry, as for `beta`.)
    scale = jnp.max(jnp.abs(tridiag))
    scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1)
    ritz = jnp.linalg.eigvalsh(tridiag / scale) * scale
    return ritz[0], ritz[-1]
