"""What users really pass: Python and NumPy scalars inside operators (under every
kind of differentiation), constant systems closed over inside transformations,
PyTree vectors with `None` leaves, infinities the operator never reads, and
initial guesses for solvers whose answer depends on them.

Each test compares with a NumPy/`jnp` float64 reference or finite differences.
"""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import sample, UserMatrixOperator

import lineax as lx


_RNG = np.random.default_rng(0)
_A = jnp.asarray(_RNG.standard_normal((3, 3)))
_SPD = _A.T @ _A + 0.5 * jnp.eye(3)
_B = jnp.asarray(_RNG.standard_normal(3))
_W = jnp.asarray(_RNG.standard_normal(3))  # weights of the scalar loss
_STRUCT = jax.ShapeDtypeStruct((3,), jnp.float64)
_I = lx.IdentityLinearOperator(_STRUCT)


#
# Python and NumPy scalars held by an operator are differentiated like arrays.
#


class _ShiftedOperator(lx.AbstractLinearOperator):
    """A user-defined operator holding a scalar field: `A + shift I`."""

    matrix: jax.Array
    shift: float

    def mv(self, vector):
        return self.matrix @ vector + self.shift * vector

    def as_matrix(self):
        return self.matrix + self.shift * jnp.eye(self.matrix.shape[0])

    def transpose(self):
        return _ShiftedOperator(self.matrix.T, self.shift)

    def in_structure(self):
        return jax.ShapeDtypeStruct((self.matrix.shape[1],), self.matrix.dtype)

    def out_structure(self):
        return jax.ShapeDtypeStruct((self.matrix.shape[0],), self.matrix.dtype)


# name -> (operator of the scalar `lam`, solver). Every operator kind that can
# hold a scalar, directly or through a closure.
_SCALAR_CASES = {
    "add_identity": (
        lambda lam: lx.MatrixLinearOperator(_SPD) + lam * _I,
        lx.AutoLinearSolver(well_posed=True),
    ),
    "mul": (lambda lam: lx.MatrixLinearOperator(_A) * lam, lx.LU()),
    "rmul": (lambda lam: lam * lx.MatrixLinearOperator(_A), lx.LU()),
    "div": (lambda lam: lx.MatrixLinearOperator(_A) / lam, lx.LU()),
    "neg_mul": (lambda lam: -(lx.MatrixLinearOperator(_A) * lam), lx.LU()),
    "composed": (
        lambda lam: (lx.MatrixLinearOperator(_A) * lam) @ lx.MatrixLinearOperator(_SPD),
        lx.LU(),
    ),
    "tagged_psd": (
        lambda lam: lx.TaggedLinearOperator(
            lx.MatrixLinearOperator(_SPD) + lam * _I, lx.positive_semidefinite_tag
        ),
        lx.AutoLinearSolver(well_posed=True),
    ),
    "function_closure": (
        lambda lam: lx.FunctionLinearOperator(lambda x: _A @ x + lam * x, _STRUCT),
        lx.LU(),
    ),
    "jacobian_args": (
        lambda lam: lx.JacobianLinearOperator(
            lambda y, args: _A @ y + args * jnp.sin(y), jnp.zeros(3), args=lam
        ),
        lx.LU(),
    ),
    "user_operator": (lambda lam: _ShiftedOperator(_A, lam), lx.LU()),
    "svd_mul": (lambda lam: lx.MatrixLinearOperator(_A) * lam, lx.SVD()),
    "qr_mul_tall": (
        lambda lam: lx.MatrixLinearOperator(jnp.concatenate([_A, _SPD[:1]])) * lam,
        lx.QR(),
    ),
}


def _loss(case: str, lam):
    make, solver = _SCALAR_CASES[case]
    operator = make(lam)
    vector = jnp.concatenate([_B, _W[:1]]) if case == "qr_mul_tall" else _B
    return jnp.dot(lx.linear_solve(operator, vector, solver).value, _W)


def _central_difference(fn, x, h=1e-6):
    return (fn(jnp.asarray(x + h)) - fn(jnp.asarray(x - h))) / (2 * h)


# The gradient at a Python float in every case, and at one of a NumPy scalar, a
# NumPy 0-d array and a JAX array rotating with the case (fixed-seed slices; all
# three with LINEAX_EXHAUSTIVE=1): each differentiates un-jitted solves.
_PRIMALS = {
    "numpy_scalar": np.float64,
    "numpy_0d": np.asarray,
    "jax_0d": jnp.asarray,
}


@pytest.mark.parametrize(
    "case, primals",
    [
        pytest.param(case, sample(_PRIMALS, i % 3, 3), id=case)
        for i, case in enumerate(sorted(_SCALAR_CASES))
    ],
)
def test_python_scalar_in_operator_is_differentiated(case, primals):
    lam = 0.7
    want = _central_difference(lambda x: _loss(case, x), lam)
    assert abs(float(want)) > 1e-3  # a zero gradient would be visible
    grad = jax.grad(lambda x: _loss(case, x))
    for primal in (lam, *[_PRIMALS[name](lam) for name in primals]):
        np.testing.assert_allclose(grad(primal), want, rtol=1e-6)
    _, tangent = jax.jvp(lambda x: _loss(case, x), (lam,), (1.0,))
    np.testing.assert_allclose(tangent, want, rtol=1e-6)


def test_python_scalar_under_jacfwd_jacrev():
    def solution(lam):
        operator = lx.MatrixLinearOperator(_SPD) + lam * _I
        return lx.linear_solve(operator, _B).value

    # d/dlam (S + lam I)^{-1} b = -(S + lam I)^{-2} b.
    lam = 0.3
    inverse = np.linalg.inv(np.asarray(_SPD) + lam * np.eye(3))
    want = -inverse @ inverse @ np.asarray(_B)
    np.testing.assert_allclose(jax.jacfwd(solution)(lam), want, rtol=1e-8)
    np.testing.assert_allclose(jax.jacrev(solution)(lam), want, rtol=1e-8)


def test_python_float_diagonal_under_grad():
    def solution(d):
        return lx.linear_solve(lx.DiagonalLinearOperator(d), jnp.asarray(2.0)).value

    np.testing.assert_allclose(jax.grad(solution)(4.0), -2.0 / 16.0, rtol=1e-12)
    np.testing.assert_allclose(jax.grad(solution)(np.float64(4.0)), -0.125)


def test_python_scalar_in_operator_and_vector_reverse_mode_under_jit():
    @jax.jit
    def loss(lam, scale):
        operator = lx.MatrixLinearOperator(_SPD) + lam * _I
        return jnp.dot(lx.linear_solve(operator, scale * _B).value, _W)

    grads = jax.grad(loss, argnums=(0, 1))(0.2, 1.5)
    want = (
        _central_difference(lambda x: loss(x, 1.5), 0.2),
        _central_difference(lambda x: loss(0.2, x), 1.5),
    )
    np.testing.assert_allclose(grads, want, rtol=1e-6)


#
# A constant system closed over inside a transformation is traced, not run eagerly.
#


def _constant_solve():
    # Closed over, not passed in: every leaf is a concrete array.
    return lx.linear_solve(lx.MatrixLinearOperator(_SPD), _B).value


_CONSTANT_WANT = np.linalg.solve(np.asarray(_SPD), np.asarray(_B))


def _custom_jvp_solve(x):
    @jax.custom_jvp
    def f(x):
        return x * _constant_solve()

    @f.defjvp
    def f_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        solution = _constant_solve()
        return x * solution, t * solution

    return jax.jvp(f, (x,), (jnp.asarray(1.0),))[1]


_TRANSFORMS = {
    "jit": lambda: jax.jit(_constant_solve)(),
    "scan": lambda: lax.scan(lambda c, _: (c, _constant_solve()), 0.0, None, 2)[1][1],
    "cond": lambda: lax.cond(jnp.asarray(True), _constant_solve, lambda: jnp.zeros(3)),
    "fori_loop": lambda: lax.fori_loop(
        0, 2, lambda i, c: _constant_solve(), jnp.zeros(3)
    ),
    "while_loop": lambda: lax.while_loop(
        lambda c: c[0] < 1, lambda c: (c[0] + 1, _constant_solve()), (0, jnp.zeros(3))
    )[1],
    "vmap": lambda: jax.vmap(lambda s: s * _constant_solve())(jnp.arange(1.0, 3.0))[0],
    "grad": lambda: jax.jacfwd(lambda s: s * _constant_solve())(1.0),
    "reverse": lambda: jax.jacrev(lambda s: s * _constant_solve())(1.0),
    "checkpoint": lambda: jax.checkpoint(lambda s: s * _constant_solve())(1.0),
    "custom_jvp": lambda: _custom_jvp_solve(jnp.asarray(2.0)),
}


@pytest.mark.parametrize("transform", sorted(_TRANSFORMS))
def test_constant_system_inside_transformation(transform):
    np.testing.assert_allclose(_TRANSFORMS[transform](), _CONSTANT_WANT, rtol=1e-10)


def test_constant_system_inside_jit_still_raises_on_failure():
    singular = lx.MatrixLinearOperator(jnp.zeros((2, 2)))

    @jax.jit
    def solve():
        return lx.linear_solve(singular, jnp.ones(2), lx.LU()).value

    with pytest.raises(Exception, match="singular"):
        solve().block_until_ready()


#
# PyTree vectors with `None` leaves (an Equinox model's parameters with the
# non-array fields filtered out).
#


_NONE_STRUCT = {"w": _STRUCT, "static": None}


def _none_operator(lam):
    def fn(tree):
        return {"w": _A @ tree["w"] + lam * tree["w"], "static": None}

    return lx.FunctionLinearOperator(fn, _NONE_STRUCT)


def test_none_leaves_in_vector_and_operator_under_jvp_and_grad():
    def loss(lam, w):
        vector = {"w": w, "static": None}
        sol = lx.linear_solve(_none_operator(lam), vector, lx.LU()).value
        assert sol["static"] is None
        return jnp.dot(sol["w"], _W)

    def reference(lam, w):
        return jnp.dot(jnp.linalg.solve(_A + lam * jnp.eye(3), w), _W)

    args = (jnp.asarray(0.4), _B)
    tangents = (jnp.asarray(1.0), _W)
    np.testing.assert_allclose(
        jax.jvp(loss, args, tangents)[1], jax.jvp(reference, args, tangents)[1]
    )
    got = jax.grad(loss, argnums=(0, 1))(*args)
    want = jax.grad(reference, argnums=(0, 1))(*args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-10)
    # Dependent columns (equation (1) of the JVP) and a transposed tangent.
    got_svd = jax.grad(
        lambda lam: jnp.dot(
            lx.linear_solve(
                _none_operator(lam), {"w": _B, "static": None}, lx.SVD()
            ).value["w"],
            _W,
        )
    )(0.4)
    np.testing.assert_allclose(got_svd, want[0], rtol=1e-8)


#
# Only what the operator computes counts as its input.
#


_SINGULAR = jnp.array([[1.0, 2.0], [2.0, 4.0]])


def test_unused_infinity_in_jacobian_args_is_not_nonfinite_input():
    def fn(y, args):
        # `args["upper"]` is a bound this function does not use for this `y`.
        return _SINGULAR @ y + jnp.minimum(0.0, args["upper"]) * 0.0

    operator = lx.JacobianLinearOperator(
        fn, jnp.zeros(2), args={"upper": jnp.asarray(jnp.inf), "lower": -jnp.inf}
    )
    sol = lx.linear_solve(operator, jnp.ones(2), lx.LU(), throw=False)
    assert sol.result == lx.RESULTS.singular


def test_unused_infinity_in_function_closure_is_not_nonfinite_input():
    bounds = jnp.array([-jnp.inf, jnp.inf])
    operator = lx.FunctionLinearOperator(
        lambda y: _SINGULAR @ y + 0 * jnp.clip(y, bounds[0], bounds[1]),
        jax.ShapeDtypeStruct((2,), jnp.float64),
    )
    sol = lx.linear_solve(operator, jnp.ones(2), lx.LU(), throw=False)
    assert sol.result == lx.RESULTS.singular


def test_used_infinity_is_nonfinite_input():
    def fn(y, args):
        return _SINGULAR @ y + args * y

    operator = lx.JacobianLinearOperator(fn, jnp.zeros(2), args=jnp.inf)
    sol = lx.linear_solve(operator, jnp.ones(2), lx.LU(), throw=False)
    assert sol.result == lx.RESULTS.nonfinite_input
    nan_matrix = lx.MatrixLinearOperator(jnp.array([[1.0, 0.0], [0.0, jnp.nan]]))
    sol = lx.linear_solve(nan_matrix, jnp.ones(2), lx.LU(), throw=False)
    assert sol.result == lx.RESULTS.nonfinite_input
    inf_vector = jnp.array([1.0, jnp.inf])
    sol = lx.linear_solve(lx.MatrixLinearOperator(_SINGULAR), inf_vector, throw=False)
    assert sol.result == lx.RESULTS.nonfinite_input


@pytest.mark.parametrize("solver", [lx.LU(), lx.QR(), lx.SVD()], ids=type)
def test_infinity_in_a_materialised_operator_is_nonfinite_input(solver):
    # `[[inf, 2], [2, 4]]` factorises to `U = [[inf, 2], [0, 4]]`, from which
    # substitution gives the finite x = [0, 1/4]: a user's operator (whose arrays
    # lineax does not read) was reported `successful` with it. (On a GPU,
    # cuSOLVER's LU also gives finite solutions where LAPACK's give NaN, so
    # that a Jacobian operator holding inf was "solved" there.)
    matrix = jnp.array([[jnp.inf, 2.0], [2.0, 4.0]])
    operator = _ShiftedOperator(matrix, 0.0)
    vector = jnp.ones(2)
    sol = lx.linear_solve(operator, vector, solver, throw=False)
    assert sol.result == lx.RESULTS.nonfinite_input
    jitted = eqx.filter_jit(lambda op, v: lx.linear_solve(op, v, solver, throw=False))
    assert jitted(operator, vector).result == lx.RESULTS.nonfinite_input
    with pytest.raises(eqx.EquinoxRuntimeError, match="NaN or inf"):
        lx.linear_solve(operator, vector, solver)


def test_huge_finite_operator_is_not_nonfinite_input():
    # A row sum overflows float64, but every entry is finite: the check of the
    # operator's action must not overflow on its own.
    big = jnp.array([[1e308, 1e308], [0.0, 0.0]])
    sol = lx.linear_solve(
        lx.MatrixLinearOperator(big), jnp.ones(2), lx.LU(), throw=False
    )
    assert sol.result == lx.RESULTS.singular


#
# An initial guess the answer depends on: the derivative is of what is returned.
#


_LSMR = lx.LSMR(rtol=1e-13, atol=1e-13, max_steps=200)


# (Compiled once per shape, its JVP and gradient too: run op by op, the
# pseudoinverse's SVD and their derivatives compiled each of their operations.)
@jax.jit
def _y0_reference(matrix, vector, y0):
    # LSMR from y0 returns y0 + A^+ (b - A y0).
    return y0 + jnp.linalg.pinv(matrix) @ (vector - matrix @ y0)


@jax.jit
def _y0_reference_jvp(primals, tangents):
    return jax.jvp(_y0_reference, primals, tangents)


def _lsmr_from(matrix, vector, y0):
    operator = lx.MatrixLinearOperator(matrix)
    return lx.linear_solve(operator, vector, _LSMR, options={"y0": y0}).value


def _y0_problem(kind):
    rng = np.random.default_rng(1)
    if kind == "underdetermined":
        matrix = jnp.asarray(rng.standard_normal((2, 4)))
        t_matrix = jnp.asarray(rng.standard_normal((2, 4)))
        vector = jnp.asarray(rng.standard_normal(2))
    else:  # square, rank 2, consistent; a rank-preserving direction
        left = rng.standard_normal((3, 2))
        matrix = jnp.asarray(left @ rng.standard_normal((2, 3)))
        t_matrix = matrix @ jnp.asarray(rng.standard_normal((3, 3)))
        vector = matrix @ jnp.asarray(rng.standard_normal(3))
    n = matrix.shape[1]
    y0 = jnp.asarray(rng.standard_normal(n))
    t_vector = jnp.asarray(rng.standard_normal(matrix.shape[0]))
    if kind != "underdetermined":
        t_vector = matrix @ t_vector  # stays consistent
    t_y0 = jnp.asarray(rng.standard_normal(n))
    return (matrix, vector, y0), (t_matrix, t_vector, t_y0)


@pytest.mark.parametrize("kind", ["underdetermined", "singular_consistent"])
def test_lsmr_y0_derivative_is_of_the_returned_value(kind):
    primals, tangents = _y0_problem(kind)
    value = _lsmr_from(*primals)
    np.testing.assert_allclose(value, _y0_reference(*primals), rtol=1e-9, atol=1e-10)
    # With respect to the operator and vector (y0 held fixed) ...
    fixed_y0 = (tangents[0], tangents[1], jnp.zeros_like(tangents[2]))
    _, got = jax.jvp(_lsmr_from, primals, fixed_y0)
    _, want = _y0_reference_jvp(primals, fixed_y0)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-8)
    # ... against finite differences of the primal itself ...
    h = 1e-6
    plus = _lsmr_from(*[p + h * t for p, t in zip(primals, fixed_y0)])
    minus = _lsmr_from(*[p - h * t for p, t in zip(primals, fixed_y0)])
    np.testing.assert_allclose(got, (plus - minus) / (2 * h), rtol=1e-5, atol=1e-6)
    # ... with respect to y0 too ...
    _, got = jax.jvp(_lsmr_from, primals, tangents)
    _, want = _y0_reference_jvp(primals, tangents)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-8)
    # ... and in reverse mode.
    loss = lambda *args: jnp.dot(_lsmr_from(*args), jnp.ones(args[0].shape[1]))
    ref_loss = lambda *args: jnp.dot(_y0_reference(*args), jnp.ones(args[0].shape[1]))
    got = jax.grad(loss, argnums=(0, 1, 2))(*primals)
    want = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(*primals)
    if kind != "underdetermined":  # only rank-preserving directions are defined
        got = [jnp.sum(got[0] * tangents[0]), got[1] @ tangents[1], got[2]]
        want = [jnp.sum(want[0] * tangents[0]), want[1] @ tangents[1], want[2]]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-7, atol=1e-8)


#
# A Python or NumPy scalar (or 0-d array) as an operator's structure: a 0-d
# structure, as in the published lineax (floats and integers in the default
# floating dtype, complex numbers in the complex one).
#


@pytest.mark.parametrize(
    "scalar",
    [2.0, 2, np.float64(2.0), np.asarray(2.0), jnp.asarray(2.0), (2.0, np.zeros(2))],
    ids=["float", "int", "numpy_scalar", "numpy_0d", "jax_0d", "tuple_with_float"],
)
def test_scalar_structure_identity_and_function_operators(scalar):
    expected = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float64), scalar
    )
    identity = lx.IdentityLinearOperator(scalar)
    function = lx.FunctionLinearOperator(
        lambda x: jax.tree.map(lambda y: 3 * y, x), scalar
    )
    for operator in (identity, function):
        assert operator.in_structure() == expected
        assert operator.out_structure() == expected
    vector = jax.tree.map(lambda s: jnp.full(s.shape, 6.0, s.dtype), expected)
    solution = lx.linear_solve(function, vector).value
    for leaf in jax.tree.leaves(solution):
        np.testing.assert_allclose(leaf, np.full(np.shape(leaf), 2.0))


def test_complex_scalar_structure():
    operator = lx.IdentityLinearOperator(1j)
    assert operator.in_structure() == jax.ShapeDtypeStruct((), jnp.complex128)


def test_python_number_vector_takes_the_operators_precision():
    # A Python number (or an array that was one: weakly typed) has no precision
    # of its own, and takes the operator's, as in JAX. It was refused for a
    # float32 operator: "converting would lose precision".
    operator = lx.DiagonalLinearOperator(jnp.float32(2.0))
    for vector in (1.0, 1, jnp.asarray(1.0)):
        value = lx.linear_solve(operator, vector).value
        assert value.dtype == jnp.float32
        np.testing.assert_allclose(value, 0.5)
    value = jax.jit(lambda v: lx.linear_solve(operator, v).value)(1.0)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(value, 0.5)
    # A PyTree operator with a float32 and a float64 leaf, and Python numbers.
    mixed = lx.PyTreeLinearOperator(
        ((jnp.float32(2.0), jnp.float64(1.0)), (jnp.float32(1.0), jnp.float64(3.0))),
        (jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.float64)),
    )
    first, second = lx.linear_solve(mixed, (1.0, 1.0), lx.LU()).value
    assert (first.dtype, second.dtype) == (np.float32, np.float64)
    np.testing.assert_allclose([first, second], [0.4, 0.2], rtol=1e-6)
    # A float64 array is not converted down.
    with pytest.raises(ValueError, match="would lose precision"):
        lx.linear_solve(operator, jnp.float64(1.0))
    with pytest.raises(ValueError, match="is complex"):
        lx.linear_solve(operator, 1j)


#
# Integer arrays put into an operator after it was built.
#


@pytest.mark.parametrize(
    "solver",
    [
        lx.QR(),
        lx.SVD(),
        lx.Cholesky(),
        lx.LU(),
        lx.CG(rtol=1e-8, atol=1e-8, max_steps=4),
    ],
    ids=lambda s: type(s).__name__,
)
def test_integer_operator_is_refused_not_truncated(solver):
    # Operators convert integer arrays when built, but `eqx.tree_at` (or
    # `jax.tree.map`, unflattening) puts them in afterwards. QR, SVD and
    # Cholesky then solved in the integer dtype, and returned [0, 0] for the
    # solution [0.2, 0.4]; LU and CG failed deep in JAX ("lu does not accept
    # dtype int64", "data type ... not inexact").
    integers = jnp.asarray([[3, 1], [1, 2]])
    built = lx.MatrixLinearOperator(jnp.eye(2), lx.positive_semidefinite_tag)
    replaced = eqx.tree_at(lambda op: op.matrix, built, integers)
    np.testing.assert_allclose(
        lx.linear_solve(
            lx.MatrixLinearOperator(integers, lx.positive_semidefinite_tag),
            jnp.asarray([1, 1]),
            solver,
        ).value,
        [0.2, 0.4],
        rtol=1e-6,
    )
    message = r"floating or complex dtypes.*maps int(64|32)\[2\] to int(64|32)\[2\]"
    for operator in (replaced, UserMatrixOperator(integers)):
        for vector in (jnp.asarray([1, 1]), jnp.asarray([1.0, 1.0])):
            with pytest.raises(TypeError, match=message):
                lx.linear_solve(operator, vector, solver)
            with pytest.raises(TypeError, match=message):
                eqx.filter_jit(lx.linear_solve)(operator, vector, solver)


@pytest.mark.parametrize(
    "solver",
    [
        lx.Diagonal(),
        lx.Diagonal(well_posed=True),
        lx.LU(),
        lx.Tridiagonal(),
        lx.AutoLinearSolver(well_posed=True),
    ],
    ids=["Diagonal", "Diagonal-well-posed", "LU", "Tridiagonal", "Auto"],
)
def test_integer_diagonal_put_in_afterwards_is_solved(solver):
    # A diagonal operator's structure is its diagonal's in the floating dtype
    # that the constructor converts integers to, so an integer diagonal put in
    # by `eqx.tree_at` passes the check above; `lx.Diagonal()` then failed deep
    # in JAX ("data type int32 not inexact"), and so did `lx.LU()` ("lu does
    # not accept dtype int32"). Its matrix, diagonal and tridiagonal are now
    # in the structure's dtype.
    built = lx.DiagonalLinearOperator(jnp.ones(2))
    operator = eqx.tree_at(lambda op: op.diagonal, built, jnp.asarray([2, 4]))
    value = lx.linear_solve(operator, jnp.asarray([1.0, 1.0]), solver).value
    assert value.dtype == built.in_structure().dtype
    np.testing.assert_allclose(value, [0.5, 0.25], rtol=1e-6)
