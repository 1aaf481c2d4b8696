"""Regression tests from an adversarial review of the extension API, as libraries
built on lineax use it (against lineax 0.1.1 run as an oracle outside the test
suite): user subclasses of `AbstractLinearOperator` implementing only the five
abstract methods (with and without registered predicates, with static fields),
used with every solver, under `jit`/`vmap`/`grad`/`jvp`, in operator arithmetic
and through `materialise`/`linearise`/`diagonal`/`tridiagonal`/`conj`; user
subclasses of `AbstractLinearSolver` (one wrapping a solver, in either form of the
rank flags, and a Jacobi iteration returning `RESULTS` codes and stats) with
result codes, `throw`, `state=` reuse, `lx.invert` and every transformation;
subclasses of concrete classes; `lineax.internal` called by signature; `RESULTS`
subclassed, promoted and compared under `jit`/`vmap`; `Solution`'s fields.

All of that agreed with NumPy and 0.1.1 (or improved on it), and so did
complex and PyTree-structured user operators, matrix-free ones (`as_matrix`
raising) with every Krylov solver, and the paper's form of the rank flags
(`allow_dependent_rows`/`allow_dependent_columns`) in every combination, except
the cases below: a user operator whose `mv` breaks its own structure under a
Krylov solver, a user solver's constant failure code under `jax.jit`, and a user
solver's `compute` returning the wrong thing. Small sizes, trace-time checks
where possible.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from conftest import raises_message
from helpers import recorded_jax_only, UserMatrixOperator

import lineax as lx


_A = jnp.array([[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 2.0]])
_B = jnp.array([1.0, -2.0, 0.5])


class _BadProduct(lx.AbstractLinearOperator):
    """A user operator whose `mv` disagrees with its `out_structure()` (a bug in
    the user's class), in the way `kind` says."""

    matrix: jax.Array
    kind: str = "shape"

    def mv(self, vector):
        product = self.matrix @ vector
        if self.kind == "shape":
            return jnp.concatenate([product, jnp.zeros(1)])
        if self.kind == "dtype":
            return product.astype(jnp.complex128)
        return (product,)  # "pytree"

    def as_matrix(self):
        return self.matrix

    def transpose(self):
        return _BadProduct(self.matrix.T, self.kind)

    def in_structure(self):
        return jax.ShapeDtypeStruct((3,), self.matrix.dtype)

    def out_structure(self):
        return jax.ShapeDtypeStruct((3,), self.matrix.dtype)


_TOL: dict[str, Any] = dict(rtol=1e-10, atol=1e-10)


# A Krylov solver carries the operator's products in its loops: a user operator
# whose `mv` returned a wrong shape, dtype or PyTree failed deep in `lax`
# ("dot_general requires contracting dimensions to have the same shape",
# "lax.dynamic_update_slice requires arguments to have the same dtypes",
# "pytree structure error: different types at key path"; lineax 0.1.1: the same
# for LSMR). Now a ValueError naming the operator's class and both structures.
@pytest.mark.parametrize("kind", ["shape", "dtype", "pytree"])
@pytest.mark.parametrize(
    "solver",
    [
        lx.GMRES(**_TOL),
        lx.BiCGStab(**_TOL),
        lx.LSMR(**_TOL),
        lx.CG(**_TOL),
        lx.Normal(lx.CG(**_TOL)),
    ],
    ids=["GMRES", "BiCGStab", "LSMR", "CG", "NormalCG"],
)
def test_krylov_names_a_user_operator_whose_mv_breaks_its_structure(kind, solver):
    operator = _BadProduct(_A, kind)
    if isinstance(solver, lx.CG):
        operator = lx.TaggedLinearOperator(operator, lx.positive_semidefinite_tag)
    # (CG's operator is the tagged one, named as such.)
    name = r"`(_BadProduct|TaggedLinearOperator)\.mv` returns a different structure"
    with raises_message(ValueError, name):
        jax.eval_shape(lambda: lx.linear_solve(operator, _B, solver))


def _always_singular(solution):
    """A user solver's output reporting a constant failure (as one does for a case
    it does not handle), not a traced one."""
    return solution, lx.RESULTS.singular, {}


# `throw=True` under `jax.jit` with a constant failure code: the error branch is
# chosen in Python for a concrete code, and `np.max` of the JAX array called its
# `.max()`, traced while the solve was being lowered: "ConcretizationTypeError:
# Abstract tracer value encountered" instead of the failure's message (lineax
# 0.1.1 raised the message).
def test_user_solver_constant_failure_raises_its_message_under_jit():
    operator = lx.MatrixLinearOperator(_A)
    solve = jax.jit(
        lambda b, throw: lx.linear_solve(
            operator, b, _UserSolver(_always_singular), throw=throw
        ),
        static_argnums=1,
    )
    assert solve(_B, False).result == lx.RESULTS.singular
    with pytest.raises(Exception, match="The operator is singular"):
        jax.block_until_ready(solve(_B, True).value)


class _UserSolver(lx.AbstractLinearSolver):
    """A user solver whose `compute` returns what `output` makes of the solution."""

    output: Callable = eqx.field(static=True)

    def init(self, operator, options):
        return operator.as_matrix()

    def compute(self, state, vector, options):
        return self.output(jnp.linalg.solve(state, vector))

    def transpose(self, state, options):
        return state.T, options

    def conj(self, state, options):
        return state.conj(), options

    def assume_full_rank(self):
        return True


# A user solver's `compute` returning the wrong thing: a solution of the wrong
# shape was returned as it was (a wrong answer; it failed only under `jax.grad`,
# in `lax`), one of the wrong PyTree failed with "'tuple' object has no
# attribute 'dtype'", a bare boolean or integer result with "'bool' object has
# no attribute '_value'", a pair with "not enough values to unpack". Now errors
# naming the solver class and what was expected.
@pytest.mark.parametrize(
    "output, error, match",
    [
        (
            lambda x: (x[:2], lx.RESULTS.successful, {}),
            ValueError,
            "float64.3.; got float64.2.",
        ),
        (lambda x: ((x,), lx.RESULTS.successful, {}), ValueError, "got PyTreeDef"),
        (lambda x: (x, True, {}), TypeError, "`result` is a bool"),
        (lambda x: (x, jnp.array(0), {}), TypeError, "`result` is an array"),
        (lambda x: (x, lx.RESULTS.successful), TypeError, "got a tuple of 2"),
    ],
    ids=["shape", "pytree", "bool_result", "int_result", "pair"],
)
def test_user_solver_compute_returning_the_wrong_thing_is_named(output, error, match):
    operator = lx.MatrixLinearOperator(_A)
    # (`pytest.raises`, strict: the test run's type checking of lineax's own
    # functions raised a `TypeCheckError` where users saw the AttributeError.)
    with pytest.raises(error, match=r"`_UserSolver\.compute` must return.*" + match):
        jax.eval_shape(lambda: lx.linear_solve(operator, _B, _UserSolver(output)))


# The structure check reads the products a Krylov method makes, not a product of
# its own: tracing one more (`jax.eval_shape(operator.mv, ...)`, as first
# written) traced a function operator's function once more in every solve
# (by the solve: GMRES 4 -> 5 traces, LSMR 4 -> 5, CG 3 -> 4), compile time for a
# large user function such as Diffrax's vector field.
@recorded_jax_only
@pytest.mark.parametrize(
    "solver, traces",
    [
        (lx.GMRES(**_TOL), 4),
        (lx.BiCGStab(**_TOL), 5),
        (lx.LSMR(**_TOL), 4),
        (lx.CG(**_TOL), 3),
    ],
    ids=["GMRES", "BiCGStab", "LSMR", "CG"],
)
def test_product_structure_check_traces_no_extra_product(solver, traces):
    # (A closure-free function, which lineax calls as it is: a closure would be
    # closure-converted to a jaxpr, and never traced again.)
    _TRACES[0] = 0
    tags = lx.positive_semidefinite_tag if isinstance(solver, lx.CG) else ()
    structure = jax.ShapeDtypeStruct((3,), jnp.float64)
    operator = lx.FunctionLinearOperator(_counted, structure, tags)
    _TRACES[0] = 0
    jax.jit(lambda b: lx.linear_solve(operator, b, solver).value).lower(_B)
    assert _TRACES[0] <= traces, _TRACES[0]


_TRACES = [0]


def _counted(v):
    _TRACES[0] += 1
    return 3 * v + jnp.cumsum(v)


class _BadTranspose(lx.AbstractLinearOperator):
    """A rectangular user operator whose `mv` (`bad`) or whose transpose's `mv`
    (`not bad`) returns one element too many."""

    matrix: jax.Array
    bad: bool = False

    def mv(self, vector):
        product = self.matrix @ vector
        return jnp.concatenate([product, jnp.zeros(1)]) if self.bad else product

    def as_matrix(self):
        return self.matrix

    def transpose(self):
        return _BadTranspose(self.matrix.T, not self.bad)

    def in_structure(self):
        return jax.ShapeDtypeStruct((self.matrix.shape[1],), self.matrix.dtype)

    def out_structure(self):
        return jax.ShapeDtypeStruct((self.matrix.shape[0],), self.matrix.dtype)


# `Normal` with a Krylov inner solver applies both `A` and `A^H` outside the
# inner solver's products too (`A^H b`, `x = A^H y`, and inside the Gram
# composition): either factor's bad product, tall or wide, is named.
@pytest.mark.parametrize("shape", [(3, 2), (2, 3)], ids=["tall", "wide"])
@pytest.mark.parametrize("bad", [True, False], ids=["A", "A^T"])
def test_normal_names_either_factor_whose_mv_breaks_its_structure(shape, bad):
    operator = _BadTranspose(jnp.ones(shape) + jnp.eye(*shape), bad)
    vector = jnp.ones(shape[0])
    name = r"`_BadTranspose\.mv` returns a different structure"
    with raises_message(ValueError, name):
        jax.eval_shape(
            lambda: lx.linear_solve(operator, vector, lx.Normal(lx.CG(**_TOL)))
        )


class _WrongTranspose(UserMatrixOperator):
    """A square user operator whose `transpose()` drops a row of the matrix (a bug
    in the user's class): its structures are not the operator's swapped."""

    def transpose(self):
        return lx.MatrixLinearOperator(self.matrix[:-1].T)


# Reverse mode solves with `operator.transpose()`. A user operator whose
# `transpose()` had the wrong structures failed deep in `lax` under a Krylov
# solver ("dot_general requires contracting dimensions to have the same shape")
# and went unnoticed under a direct one (which transposes its factorisation, not
# the operator). Now a ValueError naming the class and the structures.
@pytest.mark.parametrize("solver", [lx.GMRES(**_TOL), lx.LU()], ids=["GMRES", "LU"])
def test_grad_names_a_user_operator_whose_transpose_breaks_its_structure(solver):
    def loss(matrix):
        return lx.linear_solve(_WrongTranspose(matrix), _B, solver).value.sum()

    name = r"`_WrongTranspose\.transpose\(\)` must return an operator from"
    with raises_message(ValueError, name):
        jax.eval_shape(jax.grad(loss), _A)
