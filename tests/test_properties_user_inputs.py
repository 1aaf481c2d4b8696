"""Property test with what users pass: operators holding NumPy arrays and Python
scalars, rows and columns scaled by up to 10^±6, solved eagerly and inside
`jax.jit` (as arguments, and as closed-over constants), `lax.scan`, `lax.cond`,
`vmap` and `grad` (with respect to the Python scalar itself), against float64
NumPy references.

Scaling rows or columns loses no accuracy in LU with partial pivoting or in QR
(a column scaling scales the unknowns; a row scaling of a consistent system keeps
its solution), so those are compared component by component with the exact
answer; SVD's error is bounded by `eps * cond(A)` instead.
"""

import functools as ft

import hypothesis
import hypothesis.strategies as st
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import lineax as lx


_SOLVERS = {"lu": lx.LU(), "qr": lx.QR(), "svd": lx.SVD()}
_FORMS = ("mul", "div", "composed")
_TRANSFORMS = ("eager", "jit", "closed", "scan", "cond", "vmap", "grad")


def _operator(form, matrix, rows, columns, scalar):
    """An operator with NumPy-array and Python-float leaves representing
    `scalar * diag(rows) @ matrix @ diag(columns)` (`/ scalar` for "div")."""
    if form == "composed":
        return (
            lx.DiagonalLinearOperator(rows)
            @ lx.MatrixLinearOperator(matrix)
            @ lx.DiagonalLinearOperator(columns)
        ) * scalar
    scaled = rows[:, None] * matrix * columns[None, :]
    if form == "div":
        return lx.MatrixLinearOperator(scaled) / scalar
    return lx.MatrixLinearOperator(scaled) * scalar


def _dense(form, matrix, rows, columns, scalar):
    scaled = rows[:, None] * matrix * columns[None, :]
    return scaled / scalar if form == "div" else scaled * scalar


def _solve(kind, operator, vector):
    return lx.linear_solve(operator, vector, _SOLVERS[kind]).value


@ft.cache
def _compiled(kind: str, transform: str):
    """One function per combination; under `jax.jit` the Python-float and NumPy
    leaves of the operator are arguments, so every example reuses one compile."""
    solve = ft.partial(_solve, kind)
    if transform == "jit":
        return jax.jit(solve)
    if transform == "scan":
        return jax.jit(
            lambda op, b: lax.scan(lambda c, bi: (c, solve(op, bi)), 0, b[None])[1][0]
        )
    if transform == "cond":
        return jax.jit(
            lambda op, b: lax.cond(
                jnp.asarray(True),
                lambda: solve(op, b),
                lambda: jnp.zeros(op.in_structure().shape, b.dtype),
            )
        )
    if transform == "vmap":
        return jax.jit(
            lambda op, b: jax.vmap(solve, in_axes=(None, 0))(op, jnp.stack([b, -b]))[0]
        )
    return solve


def _problem(kind, seed, row_exponents, column_exponents):
    rng = np.random.default_rng(seed)
    n = 3
    m = 4 if kind == "qr" else n
    # A well-conditioned core, whose every row ordering has O(1) pivots.
    core = np.ones((m, n)) + 0.1 * rng.standard_normal((m, n))
    core[:n] += 3.0 * np.eye(n)
    columns = 10.0 ** np.asarray(column_exponents[:n])
    if kind == "svd":
        columns = 10.0 ** (np.asarray(column_exponents[:n]) / 3)  # 10^±2
    # Row scaling changes a least-squares problem's weights, so only LU (square,
    # consistent either way) gets it; QR's system is consistent anyway.
    rows = 10.0 ** np.asarray(row_exponents[:m]) if kind == "lu" else np.ones(m)
    if kind == "qr":
        rows = 10.0 ** (np.asarray(row_exponents[:m]) / 6)  # 10^±1
    x_true = rng.standard_normal(n) / columns
    return core, rows, columns, x_true


_EXPONENTS = st.lists(st.floats(-6.0, 6.0), min_size=4, max_size=4)


@pytest.mark.parametrize("transform", _TRANSFORMS)
@hypothesis.settings(
    # Each transformation gets a share of the profile's examples.
    max_examples=max(4, hypothesis.settings().max_examples // len(_TRANSFORMS))
)
@given(
    kind=st.sampled_from(sorted(_SOLVERS)),
    form=st.sampled_from(_FORMS),
    scalar=st.floats(0.25, 4.0),
    row_exponents=_EXPONENTS,
    column_exponents=_EXPONENTS,
    seed=st.integers(0, 2**16),
)
def test_scaled_user_operators_property(
    kind, form, transform, scalar, row_exponents, column_exponents, seed
):
    core, rows, columns, x_true = _problem(kind, seed, row_exponents, column_exponents)
    dense = _dense(form, core, rows, columns, scalar)
    vector = dense @ x_true  # consistent, so x_true is the (pseudo)inverse solution
    operator = _operator(form, core, rows, columns, scalar)
    if kind == "svd":
        want = np.linalg.pinv(dense) @ vector
        cond = np.linalg.cond(dense)
    else:
        want = np.linalg.solve(dense, vector) if kind == "lu" else x_true
        cond = 1.0

    def close(got, want, what):
        got = np.asarray(got)
        if kind == "svd":  # normwise, as its error is
            error = np.linalg.norm(got - want) / np.linalg.norm(want)
            assert error < 1e-13 * cond + 1e-12, (what, error, cond)
        else:  # component by component
            np.testing.assert_allclose(got, want, rtol=1e-8, err_msg=what)

    close(want, x_true, "numpy reference")  # the references agree with x_true
    if transform == "grad":
        weights = np.random.default_rng(seed + 1).standard_normal(x_true.shape)

        def loss(s):
            op = _operator(form, core, rows, columns, s)
            return jnp.dot(_solve(kind, op, vector), weights * columns)

        # x(s) = x_true * scalar / s for "mul", x_true * s / scalar for "div".
        value = np.dot(x_true, weights * columns)
        want_grad = value / scalar * (1.0 if form == "div" else -1.0)
        got_grad = jax.grad(loss)(scalar)  # a Python float, as users write it
        size = np.sum(np.abs(x_true * weights * columns)) / scalar
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-6, atol=1e-8 * size)
        return
    if transform == "closed":
        # A constant system closed over inside `jax.jit` (compiled per example).
        constant = lx.MatrixLinearOperator(jnp.asarray(dense))
        constant_vector = jnp.asarray(vector)
        got = jax.jit(lambda: _solve(kind, constant, constant_vector))()
        close(got, want, transform)
        return
    fn = _compiled(kind, transform)
    close(fn(operator, vector), want, transform)
