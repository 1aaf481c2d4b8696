"""Operators that mix real and complex leaves: real inputs to complex outputs
(the Jacobian of complex residuals in real parameters), or a PyTree operator
whose input has real and complex leaves.

Such an operator is not complex-linear, and `linear_solve` with a least-squares
solver returns the pseudoinverse solution of its realified problem `x -> (Re
L(x), Im L(x))`, in the operator's input dtypes (a solver for square operators
solves the promoted complex system, see the end). Compared in float64 with
NumPy's pseudoinverse of the stacked real matrix `[Re A; Im A]` (with `[-Im A;
Re A]` columns for the imaginary parts of complex inputs), and differentiated
against finite differences of that reference. (QR, SVD and `AutoLinearSolver`
returned the complex pseudoinverse solution, of complex dtype; the Krylov
solvers refused with "one dtype"; lineax 0.1.1 returned the real part of the
complex solution.)
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from beartype import beartype
from jaxtyping import Array, Bool, Complex, Float, jaxtyped

import lineax as lx


f64, c128 = jnp.float64, jnp.complex128


#
# The operators: each built from one complex matrix `a` (traced, inside the
# compiled solves), whose columns in `real_columns` take real inputs.
#


def _function(a: Array) -> lx.AbstractLinearOperator:
    n = a.shape[1]
    structure = jax.ShapeDtypeStruct((n,), jnp.real(a).dtype)
    return lx.FunctionLinearOperator(lambda x: a @ x.astype(a.dtype), structure)


_P0 = np.array([1.0, 0.5, 0.3, 2.0, 0.7])


def _jacobian(a: Array) -> lx.JacobianLinearOperator:
    # The residuals `a (p^2 + p)`, whose Jacobian at `p0` is `a diag(2 p0 + 1)`.
    n = a.shape[1]
    p0 = jnp.asarray(_P0[:n], jnp.real(a).dtype)
    fn = lambda p, args: args @ (p**2 + p).astype(args.dtype)  # noqa: E731
    return lx.JacobianLinearOperator(fn, p0, a)


def _pytree(a: Array) -> lx.AbstractLinearOperator:
    # Input {"r": 2 real, "c": 2 complex}; output {"u": 3 complex, "v": rest},
    # both complex. (An input leaf takes the dtype of its block in the first
    # output leaf: that of "r" is real, see `_reference`.)
    blocks = {
        "u": {"r": jnp.real(a[:3, :2]), "c": a[:3, 2:]},
        "v": {"r": a[3:, :2], "c": a[3:, 2:]},
    }
    dtype = a.dtype
    structure = {
        "u": jax.ShapeDtypeStruct((3,), dtype),
        "v": jax.ShapeDtypeStruct((a.shape[0] - 3,), dtype),
    }
    return lx.PyTreeLinearOperator(blocks, structure)


# name: (factory, shape of `a`, which columns take real inputs)
CASES: dict[str, tuple[Any, tuple[int, int], np.ndarray]] = {
    "tall": (_function, (6, 3), np.ones(3, bool)),
    "square": (_function, (3, 3), np.ones(3, bool)),
    "wide": (_function, (2, 5), np.ones(5, bool)),
    "jacobian": (_jacobian, (6, 3), np.ones(3, bool)),
    "pytree": (_pytree, (5, 4), np.array([True, True, False, False])),
}


def _data(name: str, dtype=c128) -> tuple[Array, Array]:
    rng = np.random.default_rng(sum(map(ord, name)))
    m, n = CASES[name][1]
    a = rng.standard_normal((m, n)) + 1j * rng.standard_normal((m, n))
    b = rng.standard_normal(m) + 1j * rng.standard_normal(m)
    return jnp.asarray(a, dtype), jnp.asarray(b, dtype)


def _vector(name: str, operator: lx.AbstractLinearOperator, b: Array) -> Any:
    if name == "pytree":
        return {"u": b[:3], "v": b[3:]}
    return b


def _flat(name: str, x: Any) -> Array:
    if name == "pytree":
        return jnp.concatenate([x["r"].astype(x["c"].dtype), x["c"]])
    return x


#
# The reference: NumPy's pseudoinverse of the stacked real matrix.
#


@jaxtyped(typechecker=beartype)
def _stacked(
    a: Complex[np.ndarray, "m n"], real_columns: Bool[np.ndarray, " n"]
) -> Float[np.ndarray, "2*m k"]:
    """The real matrix acting on `(x[real], Re x[complex], Im x[complex])`."""
    complex_ = ~real_columns
    top = np.concatenate([np.real(a), -np.imag(a)[:, complex_]], axis=1)
    bottom = np.concatenate([np.imag(a), np.real(a)[:, complex_]], axis=1)
    return np.concatenate([top, bottom])


@jaxtyped(typechecker=beartype)
def _reference(
    name: str, a: Complex[np.ndarray, "m n"], b: Complex[np.ndarray, " m"]
) -> Complex[np.ndarray, " n"]:
    """The pseudoinverse solution, as a complex vector (real where the input is)."""
    real_columns = CASES[name][2]
    if name == "jacobian":
        a = a * (2 * _P0[: a.shape[1]] + 1)
    if name == "pytree":
        a = a.copy()
        a[:3, :2] = np.real(a[:3, :2])
    y = np.linalg.pinv(_stacked(a, real_columns)) @ np.concatenate(
        [np.real(b), np.imag(b)]
    )
    n = a.shape[1]
    x = y[:n].astype(np.complex128)
    x[~real_columns] += 1j * y[n:]
    return x


# One compiled function per case and solver, shared by the tests below.
@eqx.filter_jit
def _solve(name: str, solver: lx.AbstractLinearSolver, a: Array, b: Array) -> Any:
    operator = CASES[name][0](a)
    return lx.linear_solve(operator, _vector(name, operator, b), solver).value


def _solve_flat(name, solver, a, b):
    return _flat(name, _solve(name, solver, a, b))


SOLVERS = {
    "qr": lx.QR(),
    "svd": lx.SVD(),
    "lsmr": lx.LSMR(rtol=1e-12, atol=1e-12),
    "auto": lx.AutoLinearSolver(well_posed=None),
    "normal_cholesky": lx.Normal(lx.Cholesky()),
}
# Normal equations need full column rank: the tall cases.
_PAIRS = [
    (name, solver)
    for name in CASES
    for solver in SOLVERS
    if solver != "normal_cholesky" or name in ("tall", "jacobian", "pytree")
]


@pytest.mark.parametrize("name, solver", _PAIRS)
def test_value_is_the_real_least_squares_solution(name, solver):
    a, b = _data(name)
    x = _solve(name, SOLVERS[solver], a, b)
    operator = CASES[name][0](a)
    # Exactly the input structure's dtypes: real leaves real.
    assert jtu.tree_map(lambda y: y.dtype, x) == jtu.tree_map(
        lambda s: s.dtype, operator.in_structure()
    )
    expected = _reference(name, np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(_flat(name, x), expected, rtol=1e-8, atol=1e-10)


def _fd(fn, x, t, eps=1e-6):
    return (fn(x + eps * t) - fn(x - eps * t)) / (2 * eps)


# (QR: equation (2) of the JVP; SVD: (1).)
_DERIVATIVE_PAIRS = [("tall", "qr"), ("wide", "svd"), ("pytree", "svd")]


@pytest.mark.parametrize("name, solver", _DERIVATIVE_PAIRS)
def test_jvp_and_grad_against_finite_differences(name, solver):
    a, b = _data(name)
    rng = np.random.default_rng(1)
    ta = rng.standard_normal(a.shape) + 1j * rng.standard_normal(a.shape)
    tb = rng.standard_normal(b.shape) + 1j * rng.standard_normal(b.shape)
    solver_ = SOLVERS[solver]

    def reference(a, b):
        return _reference(name, a, b)

    _, t_out = jax.jvp(
        lambda a, b: _solve_flat(name, solver_, a, b),
        (a, b),
        (jnp.asarray(ta), jnp.asarray(tb)),
    )
    a_, b_ = np.asarray(a), np.asarray(b)
    expected = (
        reference(a_ + 1e-6 * ta, b_ + 1e-6 * tb)
        - reference(a_ - 1e-6 * ta, b_ - 1e-6 * tb)
    ) / 2e-6
    np.testing.assert_allclose(t_out, expected, rtol=1e-6, atol=1e-7)

    # A real loss; `jax.grad` of it with respect to complex arrays is the conjugate
    # of d/dRe + i d/dIm, so its pairing with a direction is Re(sum(g * t)).
    weights = rng.standard_normal(a.shape[1])

    def loss(a, b):
        x = _solve_flat(name, solver_, a, b)
        return jnp.sum(weights * (jnp.real(x) ** 2 + jnp.imag(x)))

    ga, gb = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b)

    def loss_ref(a, b):
        x = reference(a, b)
        return np.sum(weights * (np.real(x) ** 2 + np.imag(x)))

    directional = np.real(np.sum(ga * ta) + np.sum(gb * tb))
    fd = (loss_ref(a_ + 1e-6 * ta, b_ + 1e-6 * tb)) - loss_ref(
        a_ - 1e-6 * ta, b_ - 1e-6 * tb
    )
    np.testing.assert_allclose(directional, fd / 2e-6, rtol=1e-6)


def test_second_order_jvp():
    # jvp of jvp along the operator: d^2/dt^2 x(a + t ta) against differences
    # of the reference's first derivative.
    name = "tall"
    a, b = _data(name)
    ta = jnp.asarray(np.random.default_rng(2).standard_normal(a.shape) + 0j)

    def first(s):
        return jax.jvp(
            lambda t: _solve(name, SOLVERS["qr"], a + t * ta, b), (s,), (1.0,)
        )[1]

    second = jax.jvp(first, (0.0,), (1.0,))[1]

    def ref_first(s):
        fn = lambda t: _reference(name, np.asarray(a + t * ta), np.asarray(b))  # noqa: E731
        return _fd(fn, s, 1.0, 1e-5)

    expected = _fd(ref_first, 0.0, 1.0, 1e-3)
    np.testing.assert_allclose(second, expected, rtol=1e-4, atol=1e-6)


def test_vmap_over_vectors_and_operators():
    name = "pytree"
    a, b = _data(name)
    a2 = a * (1 + 0.5j)
    got = jax.vmap(lambda a, b: _solve_flat(name, lx.SVD(), a, b))(
        jnp.stack([a, a2]), jnp.stack([b, 2 * b])
    )
    np.testing.assert_allclose(
        got[0], _reference(name, np.asarray(a), np.asarray(b)), rtol=1e-8
    )
    np.testing.assert_allclose(
        got[1], _reference(name, np.asarray(a2), 2 * np.asarray(b)), rtol=1e-8
    )


def test_float32():
    name = "tall"
    a, b = _data(name, jnp.complex64)
    for solver in ("qr", "lsmr"):
        if solver == "lsmr":
            solver_ = lx.LSMR(rtol=1e-5, atol=1e-5)
        else:
            solver_ = SOLVERS[solver]
        x = _solve(name, solver_, a, b)
        assert x.dtype == jnp.float32
        expected = _reference(name, np.asarray(a, np.complex128), np.asarray(b))
        np.testing.assert_allclose(x, np.real(expected), rtol=1e-3, atol=1e-4)


def test_un_jitted_state_reuse_invert_and_throw_false():
    # The PyTree operator is solved un-jitted by one cached compiled function,
    # which poses the same realified problem; a reused state is the
    # `Solution.state` of that problem, as `lx.invert` keeps it.
    name = "pytree"
    a, b = _data(name)
    operator = _pytree(a)
    vector = _vector(name, operator, b)
    expected = _reference(name, np.asarray(a), np.asarray(b))
    solution = lx.linear_solve(operator, vector, lx.QR(), throw=False)
    assert solution.result == lx.RESULTS.successful
    np.testing.assert_allclose(_flat(name, solution.value), expected, rtol=1e-8)
    again = lx.linear_solve(operator, vector, lx.QR(), state=solution.state)
    np.testing.assert_allclose(_flat(name, again.value), expected, rtol=1e-8)
    inverse = lx.invert(operator, lx.QR())
    np.testing.assert_allclose(_flat(name, inverse.mv(vector)), expected, rtol=1e-8)
    assert inverse.tags == frozenset()


#
# Solvers for square operators cannot solve the realified problem (6 x 3 for the
# square case: another shape, no tags). They solve the promoted complex system,
# as before the realified problem was posed, and return the real part at real
# leaves. Differential: lineax 0.1.1 (the published package) returns exactly
# that, the real part of NumPy's solve of the complex matrix, with `LU` and the
# default `AutoLinearSolver(well_posed=True)` (checked on this operator with
# another seed: [0.15211107, 0.1181741, -1.199496] from both, NumPy's solve
# [0.152-0.232j, 0.118+0.059j, -1.199+1.101j]); before this rule, these
# solvers refused with "needs a square operator".
#

SQUARE_SOLVERS = {
    "lu": lx.LU(),
    "auto_well_posed": lx.AutoLinearSolver(well_posed=True),
}


def _promoted(a: Any, b: Any) -> np.ndarray:
    """The solution for real inputs from the promoted complex system: the real
    part of NumPy's solve."""
    return np.real(np.linalg.solve(np.asarray(a), np.asarray(b)))


@pytest.mark.parametrize("solver", SQUARE_SOLVERS)
def test_square_solvers_solve_the_promoted_system(solver):
    a, b = _data("square")
    x = _solve("square", SQUARE_SOLVERS[solver], a, b)
    assert x.dtype == f64
    # No real solution exists here: the real part (not a least-squares solution;
    # the realified one differs).
    np.testing.assert_allclose(x, _promoted(a, b), rtol=1e-10)
    assert not np.allclose(
        x, np.real(_reference("square", np.asarray(a), np.asarray(b)))
    )
    # A right-hand side with a real solution: that solution (to rounding).
    x_true = jnp.array([1.0, -2.0, 0.5])
    x = _solve("square", SQUARE_SOLVERS[solver], a, a @ x_true.astype(c128))
    np.testing.assert_allclose(x, x_true, rtol=1e-12)


def test_square_solver_derivatives_vmap_state_and_invert():
    name, solver = "square", lx.LU()
    a, b = _data(name)
    rng = np.random.default_rng(3)
    ta = jnp.asarray(rng.standard_normal(a.shape) + 1j * rng.standard_normal(a.shape))
    tb = jnp.asarray(rng.standard_normal(b.shape) + 1j * rng.standard_normal(b.shape))
    _, t_out = jax.jvp(lambda a, b: _solve(name, solver, a, b), (a, b), (ta, tb))
    a_, b_, ta_, tb_ = map(np.asarray, (a, b, ta, tb))
    expected = (
        _promoted(a_ + 1e-6 * ta_, b_ + 1e-6 * tb_)
        - _promoted(a_ - 1e-6 * ta_, b_ - 1e-6 * tb_)
    ) / 2e-6
    assert t_out.dtype == f64
    np.testing.assert_allclose(t_out, expected, rtol=1e-6, atol=1e-8)
    # `jax.grad` of a real loss, paired with the direction (see above).
    weights = rng.standard_normal(3)
    loss = lambda a, b: jnp.sum(weights * _solve(name, solver, a, b) ** 2)  # noqa: E731
    ga, gb = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b)
    loss_ref = lambda a, b: np.sum(weights * _promoted(a, b) ** 2)  # noqa: E731
    fd = (
        loss_ref(a_ + 1e-6 * ta_, b_ + 1e-6 * tb_)
        - loss_ref(a_ - 1e-6 * ta_, b_ - 1e-6 * tb_)
    ) / 2e-6
    directional = np.real(np.sum(np.asarray(ga) * ta_) + np.sum(np.asarray(gb) * tb_))
    np.testing.assert_allclose(directional, fd, rtol=1e-6)
    got = jax.vmap(lambda b: _solve(name, solver, a, b))(jnp.stack([b, 2j * b]))
    np.testing.assert_allclose(got[1], _promoted(a, 2j * b), rtol=1e-10)
    # The state is again `solver.init` of the operator itself (the complex
    # factorisation), un-jitted too; `lx.invert` keeps it, and the tags.
    operator = _function(a)
    state = solver.init(operator, {})
    again = lx.linear_solve(operator, b, solver, state=state)
    np.testing.assert_allclose(again.value, _promoted(a, b), rtol=1e-10)
    inverse = lx.invert(operator, solver)
    np.testing.assert_allclose(inverse.mv(b), _promoted(a, b), rtol=1e-10)


@pytest.mark.parametrize(
    "name, solver, match",
    [
        ("tall", lx.LU(), "needs a square operator"),
        ("tall", lx.AutoLinearSolver(well_posed=True), "needs a square operator"),
        # (As before: the Krylov solvers for square operators combine iterates
        # and residuals, of different dtypes here.)
        ("square", lx.CG(rtol=1e-6, atol=1e-6), "structures are the same"),
        ("square", lx.GMRES(rtol=1e-6, atol=1e-6), "structures are the same"),
    ],
    ids=["lu", "auto_well_posed", "cg", "gmres"],
)
def test_square_solvers_refuse_what_they_cannot_solve(name, solver, match):
    # The tall operator (3 real inputs to 6 complex outputs) is not square
    # either way: the error is about the operator passed.
    a, b = _data(name)
    with pytest.raises(ValueError, match=match) as info:
        lx.linear_solve(_function(a), b, solver)
    if name == "tall":
        assert "input size 3 and output size 6" in str(info.value)


def test_a_state_of_the_complex_operator_is_a_clear_error():
    a, b = _data("tall")
    operator = _function(a)
    stale = lx.QR().init(operator, {})
    with pytest.raises(ValueError, match="Solution.state") as info:
        lx.linear_solve(operator, b, lx.QR(), state=stale)
    assert "maps real inputs to complex outputs" in str(info.value)


def test_initial_guess_on_a_mixed_input_is_split_too():
    # `y0` lives in the input space, whose complex leaves the realified problem
    # splits: LSMR from the solution itself makes no step.
    name = "pytree"
    a, b = _data(name)
    expected = _reference(name, np.asarray(a), np.asarray(b))
    y0 = {"r": jnp.asarray(np.real(expected[:2])), "c": jnp.asarray(expected[2:])}

    @jax.jit
    def solve(a, b, y0):
        operator = _pytree(a)
        return lx.linear_solve(
            operator,
            _vector(name, operator, b),
            lx.LSMR(rtol=1e-12, atol=1e-12),
            options={"y0": y0},
        )

    solution = solve(a, b, y0)
    np.testing.assert_allclose(_flat(name, solution.value), expected, rtol=1e-10)
    assert solution.stats["num_steps"] <= 1


@pytest.mark.parametrize("jac", [None, "bwd"])
def test_real_input_operators_act_on_complex_vectors_as_their_matrix(jac):
    # The product of the promoted (complex) matrix with a complex vector, as
    # NumPy's and a PyTree operator's: what the derivative of a square solver's
    # promoted solve applies. (Before: a closure-conversion error from
    # FunctionLinearOperator, a dtype error from JacobianLinearOperator's JVP.)
    a, _ = _data("tall")
    z = jnp.array([1.0 + 2.0j, -0.5j, 3.0])
    jacobian = _jacobian(a)
    if jac is not None:
        jacobian = lx.JacobianLinearOperator(jacobian.fn, jacobian.x, a, jac=jac)
    for operator in (_function(a), jacobian):
        matrix = np.asarray(operator.as_matrix())
        np.testing.assert_allclose(operator.mv(z), matrix @ np.asarray(z), rtol=1e-12)
