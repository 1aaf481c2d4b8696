"""Krylov solvers: `Solution.stats` (steps, products, the final true residual and
the residual history), the progress print, fixed-iteration solves
(`rtol = atol = 0`), and the derivatives of damped LSMR."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import psd, sample

import lineax as lx


_N = 12


def _case(name):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(_N, _N))
    matrix, tags = {
        "CG": (a @ a.T + _N * np.eye(_N), psd),
        "MINRES": (a + a.T, lx.symmetric_tag),
        "GMRES": (a + 2 * np.sqrt(_N) * np.eye(_N), ()),
        "BiCGStab": (a + 2 * np.sqrt(_N) * np.eye(_N), ()),
        "LSMR": (a + 2 * np.sqrt(_N) * np.eye(_N), ()),
    }[name]
    return matrix, tags, rng.normal(size=_N)


_NAMES = ["CG", "MINRES", "GMRES", "BiCGStab", "LSMR"]


@eqx.filter_jit
def _solve(matrix, tags, b, solver):
    return lx.linear_solve(
        lx.MatrixLinearOperator(matrix, tags), b, solver, throw=False
    )


@pytest.mark.parametrize("name", _NAMES)
def test_stats_report_true_residual_and_history(name):
    matrix, tags, b = _case(name)
    solver = getattr(lx, name)(1e-10, 0.0, max_steps=50)
    sol = _solve(jnp.asarray(matrix), tags, jnp.asarray(b), solver)
    assert sol.result == lx.RESULTS.successful
    stats = sol.stats
    steps = int(stats["num_steps"])
    assert int(stats["max_steps"]) == 50
    # Products: at least the steps' own, plus the verification products.
    per_step = 2 if name in ("BiCGStab", "LSMR") else 1
    assert per_step * steps < int(stats["num_mv"]) <= per_step * steps + 2 * steps
    # The final true residual, in the solver's norm.
    r = b - matrix @ np.asarray(sol.value)
    expected = np.linalg.norm(r) if name == "LSMR" else np.max(np.abs(r))
    # (Up to the rounding of `b - A x` itself, which at this tolerance is most of
    # the residual: its order of summation differs between XLA and NumPy.)
    x = np.asarray(sol.value)
    rounding = (
        len(b) * np.finfo(b.dtype).eps * np.max(np.abs(matrix) @ np.abs(x) + np.abs(b))
    )
    np.testing.assert_allclose(
        float(stats["residual_norm"]), expected, rtol=1e-3, atol=rounding
    )
    history = np.asarray(stats["residual_history"])
    assert history.shape == (50,)
    assert np.all(np.isfinite(history[:steps])) and np.all(history[steps:] == 0)


def test_history_length_records_every_kth_step():
    matrix, tags, b = _case("CG")
    solver = lx.CG(0.0, 0.0, max_steps=40, history_length=10)
    sol = _solve(jnp.asarray(matrix), tags, jnp.asarray(b), solver)
    history = np.asarray(sol.stats["residual_history"])
    assert history.shape == (10,)
    full = _solve(
        jnp.asarray(matrix), tags, jnp.asarray(b), lx.CG(0.0, 0.0, max_steps=40)
    )
    # Entry i is step 4 (i + 1).
    np.testing.assert_array_equal(
        history, np.asarray(full.stats["residual_history"])[3::4]
    )


def test_history_and_scaling_are_scale_invariant():
    matrix, tags, b = _case("GMRES")
    solver = lx.GMRES(1e-8, 0.0)
    sol = _solve(jnp.asarray(matrix), tags, jnp.asarray(b), solver)
    for factor in (1e20, 1e-20):
        scaled = _solve(jnp.asarray(matrix), tags, jnp.asarray(factor * b), solver)
        assert int(scaled.stats["num_steps"]) == int(sol.stats["num_steps"])
        np.testing.assert_allclose(scaled.value, factor * sol.value, rtol=1e-12)
        np.testing.assert_allclose(
            scaled.stats["residual_history"],
            factor * sol.stats["residual_history"],
            rtol=1e-10,
            atol=1e-12 * factor * float(sol.stats["residual_history"][0]),
        )


def test_verbose_prints_progress(capfd):
    matrix, tags, b = _case("CG")
    solver = lx.CG(1e-10, 0.0, verbose=2)
    sol = _solve(jnp.asarray(matrix), tags, jnp.asarray(b), solver)
    jax.effects_barrier()
    out = capfd.readouterr().out
    steps = int(sol.stats["num_steps"])
    assert out.count("lineax Krylov: step") == steps // 2
    assert "target" in out


def test_verbose_under_vmap_prints_every_nth_step(capfd):
    # Under `vmap` the `lax.cond` around the print became a select that ran it at
    # every step of every batch element, whatever `verbose` said.
    matrix, tags, b = _case("CG")
    solver = lx.CG(1e-10, 0.0, verbose=2)
    op = lx.MatrixLinearOperator(jnp.asarray(matrix), tags)

    def solve(v):
        return lx.linear_solve(op, v, solver, throw=False).stats["num_steps"]

    bs = jnp.stack([jnp.asarray(b), 3 * jnp.asarray(b)])
    steps = jax.vmap(solve)(bs)
    jax.effects_barrier()
    out = capfd.readouterr().out
    assert out.count("lineax Krylov: step") == sum(int(s) // 2 for s in steps)


@pytest.mark.parametrize("name", _NAMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_zero_tolerances_with_max_steps_is_a_fixed_iteration_solve(name, dtype):
    matrix, tags, b = _case(name)
    solver = getattr(lx, name)(0.0, 0.0, max_steps=30)
    sol = _solve(jnp.asarray(matrix, dtype), tags, jnp.asarray(b, dtype), solver)
    assert sol.result == lx.RESULTS.successful
    assert int(sol.stats["num_steps"]) == 30
    x = np.asarray(sol.value, np.float64)
    bound = 1e-5 if dtype == jnp.float32 else 1e-13
    assert np.linalg.norm(matrix @ x - b) <= bound * np.linalg.norm(b)


@pytest.mark.parametrize("name", _NAMES)
def test_zero_tolerances_without_max_steps_is_an_error(name):
    with pytest.raises(ValueError, match="max_steps"):
        getattr(lx, name)(0.0, 0.0)


#
# Damped LSMR: the derivative of (A^H A + d^2 I)^{-1} A^H b.
#


def _ridge(a, b, d):
    ah = a.conj().T
    return jnp.linalg.solve(ah @ a + d**2 * jnp.eye(a.shape[1], dtype=a.dtype), ah @ b)


def _damped(a, b, d):
    solver = lx.LSMR(1e-12, 1e-12)
    op = lx.MatrixLinearOperator(a)
    return lx.linear_solve(op, b, solver, options={"damp": d}).value


@eqx.filter_jit
def _damped_derivatives(f, a, b, d, ta, tb):
    x, dx = jax.jvp(lambda a, b: f(a, b, d), (a, b), (ta, tb))
    grads = jax.grad(lambda a, b: jnp.sum(jnp.abs(f(a, b, d)) ** 2), argnums=(0, 1))(
        a, b
    )
    return x, dx, grads


# Complex or real (a fixed-seed slice of the two: complex, where the conjugations
# of A^H show; both with LINEAX_EXHAUSTIVE=1; a real damped LSMR is differentiated
# below): each compiles the derivatives of a damped LSMR solve and of the ridge
# formula.
@pytest.mark.parametrize("complex_", sample([True, False]))
def test_damped_lsmr_derivatives_match_ridge(complex_):
    rng = np.random.default_rng(3)

    def draw(*shape):
        x = rng.normal(size=shape)
        return x + 1j * rng.normal(size=shape) if complex_ else x

    a, b = jnp.asarray(draw(8, 5)), jnp.asarray(draw(8))
    ta, tb = jnp.asarray(draw(8, 5)), jnp.asarray(draw(8))
    for damp in (0.0, 0.5, 2.0):
        d = jnp.asarray(damp)
        ours = _damped_derivatives(_damped, a, b, d, ta, tb)
        ref = _damped_derivatives(_ridge, a, b, d, ta, tb)
        for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
            np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8)


def test_damped_lsmr_differentiable_in_damp():
    rng = np.random.default_rng(4)
    a, b = jnp.asarray(rng.normal(size=(8, 5))), jnp.asarray(rng.normal(size=8))

    def loss(f):
        return lambda d: jnp.sum(f(a, b, d) ** 2)

    g = jax.jit(jax.grad(loss(_damped)))(jnp.asarray(0.7))
    g_ref = jax.jit(jax.grad(loss(_ridge)))(jnp.asarray(0.7))
    np.testing.assert_allclose(g, g_ref, rtol=1e-8)


def test_lsmr_success_means_normal_equations_test_on_true_residual():
    # An inconsistent least-squares problem that takes several times n steps in
    # float64: LSMR's old ||A|| estimate (the bidiagonal's Frobenius norm) had grown
    # past ||A||_F by then, and `successful` came with ||A^T r|| = 4e-7 ||A||_F ||r||
    # at rtol 1e-7. Success must mean the test holds with the true norm.
    rng = np.random.default_rng(14)
    m, n, rtol = 300, 60, 1e-7
    left, _ = np.linalg.qr(rng.normal(size=(m, n)))
    right, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = (left * np.logspace(0, -3, n)) @ right.T
    b = rng.normal(size=m)
    sol = _solve(a, (), b, lx.LSMR(rtol=rtol, atol=0.0))
    assert sol.result == lx.RESULTS.successful
    r = b - a @ np.asarray(sol.value)
    ratio = np.linalg.norm(a.T @ r) / (np.linalg.norm(a, 2) * np.linalg.norm(r))
    assert ratio <= rtol
