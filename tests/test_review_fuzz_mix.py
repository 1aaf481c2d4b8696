"""Defects found by fuzzing what an earlier fuzzer left out: PyTree operators
whose leaves mix dtypes, half precision, derivatives at rank-deficient points and
FlexibleCG. Each test here failed before the fix it protects; references are
NumPy float64. Small sizes, direct solvers or Krylov solves with few steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from beartype import beartype
from jaxtyping import Array, Complex, Float, jaxtyped

import lineax as lx


_RNG = np.random.default_rng(20261129)


def _complex(*shape: int) -> np.ndarray:
    return _RNG.normal(size=shape) + 1j * _RNG.normal(size=shape)


# A tall operator from one complex input: a complex block above a real one (a real
# matrix acting on a complex vector: its output is complex).
_TOP = _complex(2, 2)
_BOTTOM = _RNG.normal(size=(3, 2))
_MIXED_ROWS = lx.PyTreeLinearOperator(
    ((jnp.asarray(_TOP),), (jnp.asarray(_BOTTOM),)),
    (
        jax.ShapeDtypeStruct((2,), jnp.complex128),
        jax.ShapeDtypeStruct((3,), jnp.complex128),
    ),
)


@pytest.mark.parametrize(
    "solver",
    [lx.Normal(lx.Cholesky()), lx.Normal(lx.CG(rtol=1e-12, atol=1e-12, max_steps=8))],
    ids=["Normal(Cholesky)", "Normal(CG)"],
)
@jaxtyped(typechecker=beartype)
def test_normal_of_a_pytree_operator_with_a_real_block_in_a_complex_row(
    solver: lx.AbstractLinearSolver,
) -> None:
    # The transpose inferred its input structure from its first row of blocks:
    # a float64 leaf where this operator outputs complex128. `Normal` builds
    # `A^H A` and raised "Cannot compose `operator1 @ operator2`" for a valid
    # operator that SVD, QR and LSMR solve.
    op = _MIXED_ROWS
    assert op.T.in_structure() == op.out_structure()
    assert lx.conj(op.T).in_structure() == op.out_structure()
    b = (jnp.asarray(_complex(2)), jnp.asarray(_complex(3)))
    x = lx.linear_solve(op, b, solver).value
    expected = np.linalg.lstsq(
        np.vstack([_TOP, _BOTTOM]), np.concatenate(b), rcond=None
    )[0]
    np.testing.assert_allclose(np.asarray(x[0]), expected, rtol=0, atol=1e-10)


def test_materialise_keeps_a_function_operators_input_dtypes() -> None:
    # A float64 function of a float32 and a float64 input: its Jacobian's blocks
    # are float64, and `materialise` inferred a float64 input from them (lineax
    # 0.1.1 keeps float32). Solves through it then returned a float64 leaf.
    m1 = jnp.asarray(_RNG.normal(size=(4, 2)))
    m2 = jnp.asarray(_RNG.normal(size=(4, 2)))
    structure = (
        jax.ShapeDtypeStruct((2,), jnp.float32),
        jax.ShapeDtypeStruct((2,), jnp.float64),
    )
    op = lx.FunctionLinearOperator(
        lambda x: m1 @ x[0].astype(jnp.float64) + m2 @ x[1], structure
    )
    materialised = lx.materialise(op)
    assert materialised.in_structure() == structure
    b: Float[Array, " 4"] = jnp.asarray(_RNG.normal(size=4))
    x = lx.linear_solve(materialised, b, lx.SVD()).value
    assert [leaf.dtype for leaf in x] == [jnp.float32, jnp.float64]
    expected = np.linalg.lstsq(np.hstack([m1, m2]), np.asarray(b), rcond=None)[0]
    # (The float32 leaf is rounded to float32.)
    np.testing.assert_allclose(np.concatenate(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("solver", [lx.SVD(), lx.QR()], ids=["SVD", "QR"])
def test_gradient_of_a_float32_vector_leaf_is_float32(
    solver: lx.AbstractLinearSolver,
) -> None:
    # A float32 row and a float64 row: the solve computes in float64, and the
    # cotangent of the float32 vector leaf came back float64 from `jax.grad`.
    top = _RNG.normal(size=(2, 2))
    bottom = _RNG.normal(size=(1, 2))
    op = lx.PyTreeLinearOperator(
        ((jnp.asarray(top, jnp.float32),), (jnp.asarray(bottom),)),
        (
            jax.ShapeDtypeStruct((2,), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.float64),
        ),
    )
    b = (jnp.asarray([1.0, -2.0], jnp.float32), jnp.asarray([0.5]))
    w = _RNG.normal(size=2)

    def loss(vector):
        x = lx.linear_solve(op, vector, solver).value[0]
        return jnp.sum(jnp.asarray(w, jnp.float32) * x).astype(jnp.float64)

    grad = jax.grad(loss)(b)
    assert [g.dtype for g in grad] == [jnp.float32, jnp.float64]
    matrix = np.vstack([np.asarray(top, np.float32), bottom])
    expected = np.linalg.pinv(matrix).T @ w
    np.testing.assert_allclose(np.concatenate(grad), expected, rtol=1e-5, atol=1e-6)


def _textbook_cg(a: np.ndarray, b: np.ndarray, steps: int) -> np.ndarray:
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    for _ in range(steps):
        ap = a @ p
        alpha = (r @ r) / (p @ ap)
        x = x + alpha * p
        r_new = r - alpha * ap
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
    return x


# (Its own generator: a draw where CG's first three iterates all have residuals
# above `b`'s.)
_CG_RNG = np.random.default_rng(0)
_Q = np.linalg.qr(_CG_RNG.normal(size=(4, 4)))[0]
_SPD = (_Q * np.linspace(1.0, 100.0, 4)) @ _Q.T
_SPD_B = _CG_RNG.normal(size=4)


@jaxtyped(typechecker=beartype)
def test_a_fixed_iteration_cg_returns_its_last_iterate() -> None:
    # `rtol = atol = 0` with `max_steps`: a fixed number of steps, reported
    # successful. The solve returned the iterate with the smallest residual, and
    # CG's first iterates have residuals above `b`'s: 1, 2 or 3 steps returned
    # the initial guess, zero, as "successful" (lineax 0.1.1: the last iterate).
    op = lx.MatrixLinearOperator(jnp.asarray(_SPD), lx.positive_semidefinite_tag)
    b: Float[Array, " 4"] = jnp.asarray(_SPD_B)
    sol = lx.linear_solve(op, b, lx.CG(rtol=0.0, atol=0.0, max_steps=3))
    expected = _textbook_cg(_SPD, _SPD_B, 3)
    np.testing.assert_allclose(np.asarray(sol.value), expected, rtol=1e-10, atol=1e-12)
    residual = np.linalg.norm(_SPD_B - _SPD @ expected, np.inf)
    np.testing.assert_allclose(float(sol.stats["residual_norm"]), residual, rtol=1e-8)


@jaxtyped(typechecker=beartype)
def test_flexible_cg_with_a_few_inner_cg_steps_as_preconditioner() -> None:
    # The pattern FlexibleCG's docstring recommends (an inner solve with
    # `rtol = atol = 0` and a `max_steps`) made a zero preconditioner through the
    # defect above, and FlexibleCG reported a breakdown.
    op = lx.MatrixLinearOperator(jnp.asarray(_SPD), lx.positive_semidefinite_tag)
    inner = lx.invert(op, lx.CG(rtol=0.0, atol=0.0, max_steps=3))
    preconditioner = lx.TaggedLinearOperator(inner, lx.positive_semidefinite_tag)
    b: Float[Array, " 4"] = jnp.asarray(_SPD_B)
    sol = lx.linear_solve(
        op,
        b,
        lx.FlexibleCG(rtol=1e-10, atol=1e-10, max_steps=30),
        options={"preconditioner": preconditioner},
    )
    expected = np.linalg.solve(_SPD, _SPD_B)
    np.testing.assert_allclose(np.asarray(sol.value), expected, rtol=1e-8, atol=1e-10)


@jaxtyped(typechecker=beartype)
def test_reverse_mode_through_a_nonlinear_preconditioner_is_a_clear_error() -> None:
    # FlexibleCG accepts a preconditioner that varies with its input; reverse mode
    # transposes it, and for a complex one `jax.linear_transpose` failed with a
    # bare `AssertionError: (ValAccum(complex128[4]), ValAccum(complex128[]))`.
    matrix = jnp.asarray(_SPD, jnp.complex128)
    op = lx.MatrixLinearOperator(matrix, lx.positive_semidefinite_tag)
    inverse_diagonal = jnp.asarray(1 / np.diag(_SPD), jnp.complex128)
    preconditioner = lx.FunctionLinearOperator(
        lambda r: inverse_diagonal * r * (1.0 + 0.1 * jnp.tanh(jnp.vdot(r, r))),
        jax.ShapeDtypeStruct((4,), jnp.complex128),
        lx.positive_semidefinite_tag,
    )
    solver = lx.FlexibleCG(rtol=1e-8, atol=1e-8, max_steps=20)
    options = {"preconditioner": preconditioner}

    def loss(b: Complex[Array, " 4"]) -> Float[Array, ""]:
        return jnp.real(jnp.sum(lx.linear_solve(op, b, solver, options=options).value))

    with pytest.raises(ValueError, match="not linear"):
        jax.grad(loss)(jnp.asarray(_SPD_B, jnp.complex128))
