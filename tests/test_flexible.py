"""Tests of the flexible Krylov solvers, `FGMRES` and `FlexibleCG`.

Accuracy against NumPy (real and complex), iteration counts equal to GMRES's and
CG's with a fixed linear preconditioner, convergence with a varying preconditioner
(an inner GMRES solve with a loose tolerance) where GMRES and CG need many more
steps, gradients against the dense ones, `vmap`, and termination on edge inputs
(every solve there has a small `max_steps`, so none can loop).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import psd, sample

import lineax as lx


@eqx.filter_jit
def _solve(operator, vector, solver, options):
    sol = lx.linear_solve(operator, vector, solver, options=options, throw=False)
    return sol.value, sol.result, sol.stats


def _small(dtype, n=8, seed=0):
    """(nonsymmetric, Hermitian positive definite) well-conditioned matrices."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    if jnp.issubdtype(dtype, jnp.complexfloating):
        a = a + 1j * rng.normal(size=(n, n))
    return a + 3 * np.sqrt(n) * np.eye(n), a @ a.conj().T + n * np.eye(n)


def _vector(n, dtype, seed=1):
    rng = np.random.default_rng(seed)
    b = rng.normal(size=n)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        b = b + 1j * rng.normal(size=n)
    return b


def _grid(k, convection=0.0):
    """The 5-point Laplacian on a k × k grid, with a central-difference convection
    term (nonsymmetric) if `convection` is nonzero."""
    t = (
        2 * np.eye(k)
        - (1 + convection) * np.eye(k, k=-1)
        - (1 - convection) * np.eye(k, k=1)
    )
    return np.kron(t, np.eye(k)) + np.kron(np.eye(k), t)


_FLEXIBLE = {
    "FGMRES": (lambda **kw: lx.FGMRES(**kw), "nonsym"),
    "FlexibleCG": (lambda **kw: lx.FlexibleCG(**kw), "hpd"),
}
_RIGID = {"FGMRES": lx.GMRES, "FlexibleCG": lx.CG}


def _pick(name, nonsym, hpd):
    return (nonsym, ()) if _FLEXIBLE[name][1] == "nonsym" else (hpd, (psd,))


# Each solver in one of the two dtypes, alternating (a fixed-seed slice of the two;
# both with LINEAX_EXHAUSTIVE=1): each compiles two solves of its own.
@pytest.mark.parametrize(
    "name, dtype",
    [
        pytest.param(name, dtype, id=f"{jnp.dtype(dtype).name}-{name}")
        for i, name in enumerate(_FLEXIBLE)
        for dtype in sample([jnp.float64, jnp.complex128], i % 2)
    ],
)
def test_against_dense(name, dtype):
    nonsym, hpd = _small(dtype)
    matrix, tags = _pick(name, nonsym, hpd)
    b = _vector(matrix.shape[0], dtype)
    op = lx.MatrixLinearOperator(jnp.asarray(matrix, dtype), tags)
    # A fixed but nontrivial preconditioner: the inverse of the diagonal.
    precond = lx.DiagonalLinearOperator(jnp.asarray(1 / np.diag(matrix), dtype))
    solver = _FLEXIBLE[name][0](rtol=1e-12, atol=1e-12)
    expected = np.linalg.solve(matrix, b)
    for options in ({}, {"preconditioner": precond}):
        value, result, stats = _solve(op, jnp.asarray(b, dtype), solver, options)
        assert result == lx.RESULTS.successful
        assert value.dtype == dtype
        np.testing.assert_allclose(value, expected, rtol=0, atol=1e-10)
        assert set(stats) == {
            "num_steps",
            "max_steps",
            "num_mv",
            "residual_norm",
            "residual_history",
        }
        assert 0 < int(stats["num_steps"]) <= int(stats["max_steps"])


def test_negative_definite_truncation_y0():
    _, hpd = _small(jnp.float64)
    n = hpd.shape[0]
    b = _vector(n, jnp.float64)
    op = lx.MatrixLinearOperator(jnp.asarray(-hpd), lx.negative_semidefinite_tag)
    # Preconditions `-A`, as for CG; three stored directions (a ring buffer that
    # wraps around within the solve).
    options = {
        "preconditioner": lx.DiagonalLinearOperator(jnp.asarray(1 / np.diag(hpd))),
        "y0": jnp.ones(n),
    }
    solver = lx.FlexibleCG(rtol=1e-12, atol=1e-12, truncation=3)
    value, result, stats = _solve(op, jnp.asarray(b), solver, options)
    assert result == lx.RESULTS.successful
    assert int(stats["num_steps"]) > 3
    np.testing.assert_allclose(value, np.linalg.solve(-hpd, b), rtol=0, atol=1e-10)


def test_fgmres_pytree():
    nonsym, _ = _small(jnp.float64, n=6)
    b = _vector(6, jnp.float64)
    struct = {
        "a": jax.ShapeDtypeStruct((2,), jnp.float64),
        "b": jax.ShapeDtypeStruct((2, 2), jnp.float64),
    }

    def split(v):
        return {"a": v[:2], "b": v[2:].reshape(2, 2)}

    def fn(x):
        return split(jnp.asarray(nonsym) @ jnp.concatenate([x["a"], x["b"].ravel()]))

    op = lx.FunctionLinearOperator(fn, struct)
    precond = lx.IdentityLinearOperator(struct) * 0.5
    solver = lx.FGMRES(rtol=1e-12, atol=1e-12, restart=3)
    value, result, _ = _solve(
        op, split(jnp.asarray(b)), solver, {"preconditioner": precond}
    )
    assert result == lx.RESULTS.successful
    flat = np.concatenate([value["a"], np.ravel(value["b"])])
    np.testing.assert_allclose(flat, np.linalg.solve(nonsym, b), rtol=0, atol=1e-10)


def _fixed_preconditioner(matrix):
    """The inverse of the block-tridiagonal part (the x-direction couplings) of a
    grid operator: a fixed linear preconditioner, symmetric when `matrix` is."""
    k = int(round(np.sqrt(matrix.shape[0])))
    mask = np.kron(np.eye(k), np.ones((k, k)))
    return np.linalg.inv(matrix * mask)


@pytest.mark.parametrize("name", list(_FLEXIBLE))
def test_fixed_preconditioner_same_iterations(name):
    # With one fixed linear preconditioner a flexible method makes the same
    # iterates (in exact arithmetic) as the rigid one.
    convection = 0.3 if name == "FGMRES" else 0.0
    matrix = _grid(8, convection)
    tags = (psd,) if name == "FlexibleCG" else ()
    b = _vector(matrix.shape[0], jnp.float64)
    op = lx.MatrixLinearOperator(jnp.asarray(matrix), tags)
    precond = lx.MatrixLinearOperator(jnp.asarray(_fixed_preconditioner(matrix)), tags)
    options = {"preconditioner": precond}
    kw = dict(rtol=1e-8, atol=0.0, max_steps=200)
    flex = _solve(op, jnp.asarray(b), _FLEXIBLE[name][0](**kw), options)
    rigid = _solve(op, jnp.asarray(b), _RIGID[name](**kw), options)
    for value, result, _ in (flex, rigid):
        assert result == lx.RESULTS.successful
        np.testing.assert_allclose(value, np.linalg.solve(matrix, b), atol=1e-6)
    flex_steps = int(flex[2]["num_steps"])
    rigid_steps = int(rigid[2]["num_steps"])
    assert abs(flex_steps - rigid_steps) <= 1, (flex_steps, rigid_steps)


# The varying preconditioner: an inner GMRES solve with a loose tolerance (its `mv`
# is a nonlinear function of its input). Built once per matrix, so the jitted
# solves below see the same preconditioner object.
_K = 10
_VARYING = {}
for _name, _convection, _tags in (("FGMRES", 0.4, ()), ("FlexibleCG", 0.0, (psd,))):
    _matrix = _grid(_K, _convection)
    _VARYING[_name] = (
        _matrix,
        _tags,
        lx.invert(
            lx.MatrixLinearOperator(jnp.asarray(_matrix), _tags),
            lx.GMRES(rtol=0.3, atol=0.0, restart=5, max_steps=10),
            throw=False,
        ),
    )


@pytest.mark.parametrize("name", list(_FLEXIBLE))
def test_varying_preconditioner(name):
    matrix, tags, precond = _VARYING[name]
    b = _vector(matrix.shape[0], jnp.float64)
    op = lx.MatrixLinearOperator(jnp.asarray(matrix), tags)
    options = {"preconditioner": precond}
    kw = dict(rtol=1e-8, atol=0.0, max_steps=300)
    value, result, stats = _solve(op, jnp.asarray(b), _FLEXIBLE[name][0](**kw), options)
    assert result == lx.RESULTS.successful
    residual = np.max(np.abs(b - matrix @ np.asarray(value)))
    assert residual <= 1e-8 * np.max(np.abs(b))
    flex_steps = int(stats["num_steps"])
    assert flex_steps <= 20
    # The rigid method, with the same preconditioner, needs many more steps (on
    # this problem 44 for CG and 59 for GMRES, against 15 and 11).
    _, rigid_result, rigid_stats = _solve(
        op, jnp.asarray(b), _RIGID[name](**kw), options
    )
    rigid_steps = int(rigid_stats["num_steps"])
    assert rigid_result != lx.RESULTS.successful or rigid_steps >= 2.5 * flex_steps


@pytest.mark.parametrize("name", list(_FLEXIBLE))
def test_gradients_match_dense(name):
    nonsym, hpd = _small(jnp.float64)
    matrix, tags = _pick(name, nonsym, hpd)
    n = matrix.shape[0]
    b = _vector(n, jnp.float64)
    w = _vector(n, jnp.float64, seed=2)
    # A varying preconditioner: reverse mode solves with its transpose (an inner
    # GMRES solve with the transposed matrix).
    precond = lx.invert(
        lx.MatrixLinearOperator(jnp.asarray(matrix), tags),
        lx.GMRES(rtol=0.3, atol=0.0, max_steps=4),
        throw=False,
    )
    solver = _FLEXIBLE[name][0](rtol=1e-12, atol=1e-12)

    @jax.jit
    @jax.grad
    def grad(args):
        a, v = args
        op = lx.MatrixLinearOperator(a, tags)
        x = lx.linear_solve(op, v, solver, options={"preconditioner": precond}).value
        return jnp.sum(jnp.asarray(w) * x)

    grad_a, grad_b = grad((jnp.asarray(matrix), jnp.asarray(b)))
    x = np.linalg.solve(matrix, b)
    adjoint = np.linalg.solve(matrix.T, w)
    np.testing.assert_allclose(grad_b, adjoint, rtol=0, atol=1e-9)
    np.testing.assert_allclose(grad_a, -np.outer(adjoint, x), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", list(_FLEXIBLE))
def test_vmap(name):
    nonsym, hpd = _small(jnp.float64)
    matrix, tags = _pick(name, nonsym, hpd)
    n = matrix.shape[0]
    # Three right-hand sides, one of them zero (done before the others start).
    bs = np.stack([_vector(n, jnp.float64, s) for s in (1, 2)] + [np.zeros(n)])
    scales = np.array([1.0, 2.0, 0.5])
    solver = _FLEXIBLE[name][0](rtol=1e-10, atol=1e-10)
    precond = lx.DiagonalLinearOperator(jnp.asarray(1 / np.diag(matrix)))

    @jax.jit
    @jax.vmap
    def solve(scale, b):
        op = lx.MatrixLinearOperator(scale * jnp.asarray(matrix), tags)
        sol = lx.linear_solve(op, b, solver, options={"preconditioner": precond})
        return sol.value, sol.stats["num_steps"]

    values, steps = solve(jnp.asarray(scales), jnp.asarray(bs))
    for scale, b, value in zip(scales, bs, values):
        np.testing.assert_allclose(
            value, np.linalg.solve(scale * matrix, b), rtol=0, atol=1e-8
        )
    assert int(steps[2]) == 0


@pytest.mark.parametrize("name", list(_FLEXIBLE))
def test_edge_inputs_terminate(name):
    nonsym, hpd = _small(jnp.float64)
    matrix, tags = _pick(name, nonsym, hpd)
    n = matrix.shape[0]
    op = lx.MatrixLinearOperator(jnp.asarray(matrix), tags)
    make = _FLEXIBLE[name][0]
    b = jnp.asarray(_vector(n, jnp.float64))

    # Zero right-hand side: zero, at once.
    solver = make(rtol=1e-8, atol=0.0, max_steps=30)
    value, result, stats = _solve(op, jnp.zeros(n), solver, {})
    assert result == lx.RESULTS.successful
    assert int(stats["num_steps"]) == 0
    np.testing.assert_array_equal(value, np.zeros(n))

    # NaN in the right-hand side: a failure, not a loop.
    _, result, stats = _solve(op, b.at[2].set(jnp.nan), solver, {})
    assert result != lx.RESULTS.successful
    assert int(stats["num_steps"]) <= 30

    # A tolerance below what float64 can reach: stops, with the best iterate.
    solver = make(rtol=1e-30, atol=0.0, max_steps=60)
    value, result, stats = _solve(op, b, solver, {})
    assert result in (lx.RESULTS.stagnation, lx.RESULTS.max_steps_reached)
    assert int(stats["num_steps"]) <= 60
    np.testing.assert_allclose(
        value, np.linalg.solve(matrix, np.asarray(b)), atol=1e-10
    )
    assert np.isfinite(float(stats["residual_norm"]))

    # A preconditioner that maps everything to zero: no direction to search in.
    zero = lx.MatrixLinearOperator(jnp.zeros((n, n)))
    value, result, stats = _solve(op, b, solver, {"preconditioner": zero})
    assert result == lx.RESULTS.breakdown
    np.testing.assert_array_equal(value, np.zeros(n))

    # rtol = atol = 0: exactly `max_steps` steps, reported successful.
    solver = make(rtol=0.0, atol=0.0, max_steps=3)
    _, result, stats = _solve(op, b, solver, {})
    assert result == lx.RESULTS.successful
    assert int(stats["num_steps"]) == 3


def test_argument_errors():
    with pytest.raises(ValueError, match="truncation"):
        lx.FlexibleCG(rtol=1e-6, atol=0.0, truncation=0)
    with pytest.raises(ValueError, match="restart"):
        lx.FGMRES(rtol=1e-6, atol=0.0, restart=0)
    square = lx.MatrixLinearOperator(jnp.eye(3))
    with pytest.raises(ValueError, match="FlexibleCG"):
        lx.linear_solve(square, jnp.ones(3), lx.FlexibleCG(rtol=1e-6, atol=0.0))
    tall = lx.MatrixLinearOperator(jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="FGMRES"):
        lx.linear_solve(tall, jnp.ones(4), lx.FGMRES(rtol=1e-6, atol=0.0))
    with pytest.raises(ValueError, match="preconditioner"):
        lx.linear_solve(
            square,
            jnp.ones(3),
            lx.FGMRES(rtol=1e-6, atol=0.0),
            options={"preconditioner": lx.MatrixLinearOperator(jnp.eye(4))},
        )
