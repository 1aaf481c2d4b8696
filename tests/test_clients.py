"""Libraries built on lineax — Optimistix and Diffrax — run on this package.

They are optional test dependencies. Install them without letting pip pull the
published `lineax` from PyPI (it would shadow this one):

    pip install --no-deps optimistix diffrax
    pip install equinox jaxtyping typing_extensions wadler_lindig

(see requirements-clients.txt). The tests skip when they are not installed.
"""

import pathlib

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import pytest

import lineax as lx


optx = pytest.importorskip("optimistix")

_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _EnableX64():
    """Float64 within a `with` block (the setting is restored afterwards)."""
    return jax.enable_x64(True)


def test_clients_use_this_lineax():
    location = pathlib.Path(lx.__file__).resolve()
    from_source_tree = (_ROOT / "src") in location.parents
    # The published lineax (0.1.x on PyPI) has no MINRES; this package does.
    assert from_source_tree or hasattr(lx, "MINRES"), (
        f"optimistix/diffrax would run on a foreign lineax at {location}; "
        "install them with `pip install --no-deps`"
    )


def test_optimistix_newton_root_find():
    with _EnableX64():
        # Intersect the circle x² + y² = 4 with the line x = y.
        def fn(y, args):
            x, z = y
            return jnp.stack([x**2 + z**2 - args, x - z])

        solver = optx.Newton(rtol=1e-10, atol=1e-10)
        sol = optx.root_find(fn, solver, jnp.array([1.0, 0.5]), args=jnp.array(4.0))
        assert sol.result == optx.RESULTS.successful
        np.testing.assert_allclose(sol.value, [np.sqrt(2), np.sqrt(2)], rtol=1e-9)

        # Implicit differentiation of the root runs through lineax's linear_solve
        # (a transposed solve with a Jacobian operator): d sqrt(a/2) / da.
        def root(a):
            return optx.root_find(fn, solver, jnp.array([1.0, 0.5]), args=a).value[0]

        a = jnp.array(4.0)
        np.testing.assert_allclose(
            jax.grad(root)(a), 1 / (4 * np.sqrt(a / 2)), rtol=1e-8
        )


def test_optimistix_gauss_newton_rosenbrock():
    with _EnableX64():

        def residuals(y, args):
            x, z = y
            return jnp.stack([1 - x, 10 * (z - x**2)])

        solver = optx.GaussNewton(rtol=1e-10, atol=1e-10)
        sol = optx.least_squares(residuals, solver, jnp.array([-1.2, 1.0]))
        assert sol.result == optx.RESULTS.successful
        np.testing.assert_allclose(sol.value, [1.0, 1.0], rtol=1e-8)


def test_optimistix_levenberg_marquardt_curve_fit():
    with _EnableX64():
        t = jnp.linspace(0.0, 3.0, 20)
        data = 2.0 * jnp.exp(-0.5 * t) + 0.3

        def residuals(params, args):
            t, data = args
            return params["a"] * jnp.exp(params["b"] * t) + params["c"] - data

        solver = optx.LevenbergMarquardt(rtol=1e-10, atol=1e-10)
        y0 = {"a": jnp.array(1.0), "b": jnp.array(-1.0), "c": jnp.array(0.0)}
        sol = optx.least_squares(residuals, solver, y0, args=(t, data), max_steps=256)
        assert sol.result == optx.RESULTS.successful
        np.testing.assert_allclose(sol.value["a"], 2.0, rtol=1e-7)
        np.testing.assert_allclose(sol.value["b"], -0.5, rtol=1e-7)
        np.testing.assert_allclose(sol.value["c"], 0.3, rtol=1e-7, atol=1e-8)


def test_diffrax_kvaerno5_stiff_linear():
    diffrax = pytest.importorskip("diffrax")
    with _EnableX64():
        # y' = A y with eigenvalues -1 and -1000 (stiff); exact solution expm(tA) y0.
        p = jnp.array([[1.0, 1.0], [0.0, 1.0]])
        a = p @ jnp.diag(jnp.array([-1000.0, -1.0])) @ jnp.linalg.inv(p)
        y0 = jnp.array([1.0, 2.0])

        term = diffrax.ODETerm(lambda t, y, args: args @ y)
        ts = jnp.array([0.01, 0.5, 1.0])
        sol = diffrax.diffeqsolve(
            term,
            diffrax.Kvaerno5(),
            t0=0.0,
            t1=1.0,
            dt0=1e-4,
            y0=y0,
            args=a,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=1e-9, atol=1e-9),
            max_steps=4096,
        )
        assert sol.result == diffrax.RESULTS.successful
        exact = jnp.stack([jsl.expm(t * a) @ y0 for t in ts])
        np.testing.assert_allclose(sol.ys, exact, rtol=1e-6, atol=1e-8)
        # Stiff: an implicit solver needs far fewer steps than 1000 * t1.
        assert int(sol.stats["num_accepted_steps"]) < 500
