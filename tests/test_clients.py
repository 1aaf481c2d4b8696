"""Libraries built on lineax — Optimistix and Diffrax — run on this package.

They are optional test dependencies. Install them without letting pip pull the
published `lineax` from PyPI (it would shadow this one):

    pip install --no-deps optimistix diffrax
    pip install equinox jaxtyping typing_extensions wadler_lindig

(see requirements-clients.txt). The tests skip when they are not installed.
"""

import pathlib
import textwrap

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import pytest
from helpers import float32_user, RECORDED_JAX

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


def test_optimistix_gauss_newton_complex_residuals_in_real_parameters():
    # An impedance spectrum R0 + R1 / (1 + i w R1 C) fitted in real (R0, R1, C):
    # the Jacobian maps real parameters to complex residuals, and each step is
    # the real least-squares solution (of [Re J; Im J]). The complex solution
    # made the step complex (a `lax.cond` type error in Optimistix's loop);
    # lineax 0.1.1's real part of it fitted (0.49790, 2.00777, 0.09880).
    # (Standard promotion, as users have: `1j * w` promotes float64 to complex.)
    with _EnableX64(), jax.numpy_dtype_promotion("standard"):
        w = jnp.logspace(-1, 3, 12)

        def model(p, w):
            r0, r1, c = p
            return r0 + r1 / (1 + 1j * w * r1 * c)

        rng = np.random.default_rng(0)
        noise = rng.standard_normal(12) + 1j * rng.standard_normal(12)
        data = model(jnp.array([0.5, 2.0, 0.1]), w) + 0.01 * noise

        def residuals(p, args):
            return model(p, w) - data

        solver = optx.GaussNewton(rtol=1e-10, atol=1e-10)
        with pytest.warns(UserWarning, match="Complex support in Optimistix"):
            sol = optx.least_squares(residuals, solver, jnp.array([1.0, 1.0, 0.05]))
        assert sol.result == optx.RESULTS.successful
        assert sol.value.dtype == jnp.float64
        # The minimiser of the stacked real residuals (SciPy's `least_squares`,
        # and NumPy Gauss-Newton with `lstsq` on [Re J; Im J], agree).
        np.testing.assert_allclose(
            sol.value, [0.49972303, 2.00346826, 0.10032755], rtol=1e-7
        )


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


def test_optimistix_newton_badly_scaled_float32():
    # Unknowns of sizes 1e4 and 1e-4 (e.g. metres and megametres): the Jacobian's
    # columns differ by 1e8, which LU handles exactly.
    with float32_user():
        scale = jnp.array([1e4, 1e-4], jnp.float32)

        def fn(x, args):
            u, v = x / scale
            return jnp.stack([u + v - 3.0, u * v - 2.0])

        y0 = jnp.array([0.8, 2.3], jnp.float32) * scale
        solver = optx.Newton(rtol=1e-5, atol=1e-5)
        sol = optx.root_find(fn, solver, y0, throw=False, max_steps=50)
        assert sol.result == optx.RESULTS.successful
        np.testing.assert_allclose(sol.value / scale, [1.0, 2.0], rtol=1e-5)


def test_optimistix_gauss_newton_polynomial_fit_float32():
    # A quadratic fitted on t in [0, 1e4]: the Jacobian's columns 1, t, t² span
    # eight orders of magnitude.
    with float32_user():
        t = jnp.linspace(0.0, 1e4, 50, dtype=jnp.float32)
        coeffs = np.array([1.0, 2e-3, 3e-7])
        data = jnp.asarray(coeffs[0] + coeffs[1] * t + coeffs[2] * t**2, jnp.float32)

        def residuals(c, args):
            return c[0] + c[1] * t + c[2] * t**2 - data

        solver = optx.GaussNewton(rtol=1e-4, atol=1e-4)
        y0 = jnp.zeros(3, jnp.float32)
        sol = optx.least_squares(residuals, solver, y0, throw=False, max_steps=50)
        assert sol.result == optx.RESULTS.successful
        np.testing.assert_allclose(sol.value, coeffs, rtol=1e-4)


def test_optimistix_bfgs_badly_scaled_float32():
    # BFGS with a Hessian approximation (`use_inverse=False`) solves a
    # positive-definite system each step; the unknowns differ in scale by 1e4.
    with float32_user():
        scale = jnp.array([1e2, 1e-2], jnp.float32)

        def fn(x, args):
            u, v = x / scale - jnp.array([1.0, 2.0], jnp.float32)
            return u**2 + 3.0 * v**2 + u * v + 0.1 * u**4

        solver = optx.BFGS(rtol=1e-4, atol=1e-4, use_inverse=False)
        y0 = jnp.zeros(2, jnp.float32)
        sol = optx.minimise(fn, solver, y0, throw=False, max_steps=100)
        assert sol.result == optx.RESULTS.successful
        np.testing.assert_allclose(sol.value / scale, [1.0, 2.0], rtol=1e-3)


def test_optimistix_indirect_levenberg_marquardt_badly_scaled_float32():
    # Unknowns in units of 1e3 and 1e-3, residuals scaled by 1e4: the Jacobian is
    # 4x2 with columns of norms 17 and 1.1e7. Its Newton step is the SVD's
    # least-squares solution (`AutoLinearSolver(well_posed=False)`); the SVD of
    # the transposed (wide) Jacobian got it 0.23% wrong, and the solver ended 14
    # steps later 2.5e-5 away from the minimum (lineax 0.1.1: 8 steps, 2e-8).
    with float32_user():

        def residuals(p, args):
            x, y = p["big"] / 1e3, p["small"] * 1e3
            r = jnp.stack([x - 1.0, y - 2.0, x * y - 2.0, jnp.sin(x) + y / 1e3])
            return 1e4 * r

        p0 = {"big": jnp.array(500.0), "small": jnp.array(1e-3)}
        operator = lx.JacobianLinearOperator(residuals, p0)
        matrix = np.asarray(operator.as_matrix(), np.float64)
        vector = residuals(p0, None)
        solver = lx.AutoLinearSolver(well_posed=False)
        newton = lx.linear_solve(operator, vector, solver)
        expected = np.linalg.lstsq(matrix, np.asarray(vector, np.float64))[0]
        got = [newton.value["big"], newton.value["small"]]
        np.testing.assert_allclose(got, expected, rtol=1e-5)

        solver = optx.IndirectLevenbergMarquardt(rtol=1e-5, atol=1e-5)
        sol = optx.least_squares(residuals, solver, p0, max_steps=20, throw=False)
        assert sol.result == optx.RESULTS.successful
        # The minimum (float64): big = 857.13987667, small = 0.0021407423091.
        got = [sol.value["big"], sol.value["small"]]
        if jax.__version__ == RECORDED_JAX:
            # (As lineax 0.1.1 on that JAX. With another, the rounding differs,
            # and so may the path: jax 0.12.0.1 took 12 steps, to a relative
            # 1.6e-5 of the minimum, within the solver's `rtol`.)
            assert sol.stats["num_steps"] <= 10
            np.testing.assert_allclose(got, [857.13987667, 2.1407423091e-3], rtol=2e-6)
        else:
            np.testing.assert_allclose(got, [857.13987667, 2.1407423091e-3], rtol=5e-5)


def test_optimistix_indirect_levenberg_marquardt_fits_mlp():
    # Optimistix's "simple_nn" least-squares problem: the unknowns are an Equinox
    # MLP's parameters, a PyTree with `None` where the non-array fields were
    # filtered out; every operator rule must accept those `None` leaves.
    eqx = pytest.importorskip("equinox")
    with _EnableX64():
        model = eqx.nn.MLP(1, 1, 4, 1, key=jax.random.key(0))
        params, static = eqx.partition(model, eqx.is_inexact_array)
        x = jnp.linspace(-1.0, 1.0, 8)[:, None]
        y = jnp.sin(2 * x)

        def residuals(params, args):
            return jax.vmap(eqx.combine(params, static))(x) - y

        def loss(params):
            return 0.5 * jnp.sum(residuals(params, None) ** 2)

        solver = optx.IndirectLevenbergMarquardt(rtol=1e-6, atol=1e-6)
        sol = optx.least_squares(residuals, solver, params, max_steps=100, throw=False)
        assert sol.result == optx.RESULTS.successful
        assert loss(sol.value) < 0.5 * loss(params)
        # At a local minimum the gradient vanishes.
        grads = jax.tree_util.tree_leaves(jax.grad(loss)(sol.value))
        assert max(float(jnp.max(jnp.abs(g))) for g in grads) < 1e-3


def test_diffrax_event_grad_of_vmap():
    # The root find of the event is differentiated implicitly by Optimistix, whose
    # JVP (calling `linear_solve`) is batched by `vmap`: JAX's batching of a
    # `lax.cond` then puts `stop_gradient`s into the linear function that reverse
    # mode transposes.
    diffrax = pytest.importorskip("diffrax")

    def run(param):
        term = diffrax.ODETerm(lambda t, y, args: args - y)
        event = diffrax.Event(
            lambda t, y, args, **kwargs: y - 1.5,
            root_finder=diffrax.VeryChord(rtol=1e-3, atol=1e-6),
        )
        sol = diffrax.diffeqsolve(
            term,
            diffrax.Euler(),
            t0=0.0,
            t1=10.0,
            dt0=0.1,
            y0=0.0,
            args=param,
            event=event,
        )
        assert sol.ys is not None
        return param**2 + sol.ys[-1] ** 2

    def loss(params):
        return jnp.sum(jax.vmap(run)(params))

    params = jnp.array([1.0, 2.0, 3.0])
    grads = jax.grad(loss)(params)
    # param = 1 never reaches the event (y -> 1, y(10) = 1 - 0.9^100 on this
    # grid); for 2 and 3 the event fixes y_final = 1.5, so only param² is left.
    np.testing.assert_allclose(
        grads, [2.0 + 2 * (1 - 0.9**100) ** 2 / 1.0, 4.0, 6.0], rtol=1e-4
    )


def test_diffrax_kvaerno5_stiff_grad():
    # Reverse mode through an implicit stiff solver: every Newton step's linear
    # solve is differentiated. y' = A(p) y with eigenvalues -1000 p and -p; the
    # exact d/dp sum(expm(A(p)) y0) comes from differentiating the matrix
    # exponential.
    diffrax = pytest.importorskip("diffrax")
    with _EnableX64():
        basis = jnp.array([[1.0, 1.0], [0.0, 1.0]])
        y0 = jnp.array([1.0, 2.0])

        def matrix(p):
            eigenvalues = jnp.stack([-1000.0 * p, -p])
            return basis @ jnp.diag(eigenvalues) @ jnp.linalg.inv(basis)

        def solve(p):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, y, args: matrix(args) @ y),
                diffrax.Kvaerno5(),
                t0=0.0,
                t1=1.0,
                dt0=1e-3,
                y0=y0,
                args=p,
                stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
                max_steps=1024,
            )
            assert sol.ys is not None
            return jnp.sum(sol.ys[-1])

        def exact(p):
            return jnp.sum(jsl.expm(matrix(p)) @ y0)

        p = jnp.array(1.0)
        # One compile for the value and its gradient (not one for each).
        value, grad = jax.jit(jax.value_and_grad(solve))(p)
        want_value, want_grad = jax.jit(jax.value_and_grad(exact))(p)
        np.testing.assert_allclose(value, want_value, rtol=1e-6)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-5)


def test_optimistix_newton_with_gmres_looser_than_newton_converges():
    # A Krylov solve whose right-hand side already meets its tolerance (|b| <=
    # atol) still takes a step (as lineax 0.1.1 does). It returned x = 0 after no
    # step, so Newton with a tighter atol than its Krylov solver got a zero update
    # forever and ran to max_steps; Diffrax's implicit solvers with such a root
    # finder failed the same way (Robertson: ImplicitEuler failed at its first step).
    with _EnableX64():
        # The first implicit-Euler stage of the Robertson problem (h = 1e-4), as
        # `diffrax.ImplicitEuler(root_finder=optx.Newton(..., linear_solver=GMRES))`
        # solves it.
        def stage(k, h):
            y1, y2, y3 = jnp.array([1.0, 0.0, 0.0]) + k
            f = jnp.stack(
                [
                    -0.04 * y1 + 1e4 * y2 * y3,
                    0.04 * y1 - 3e7 * y2**2 - 1e4 * y2 * y3,
                    3e7 * y2**2,
                ]
            )
            return k - h * f

        gmres = lx.GMRES(rtol=1e-7, atol=1e-7, max_steps=200, restart=20)
        solver = optx.Newton(rtol=1e-8, atol=1e-8, linear_solver=gmres)
        sol = optx.root_find(
            stage, solver, jnp.zeros(3), args=1e-4, throw=False, max_steps=10
        )
        assert sol.result == optx.RESULTS.successful
        assert float(jnp.max(jnp.abs(stage(sol.value, 1e-4)))) < 1e-8


# GMRES and BiCGStab took an operator whose input and output structures differ
# but have equal sizes (the square check compared sizes), then failed inside with
# JAX's "Closure-converted function called with different dynamic arguments".
# Optimistix Newton (a residual PyTree other than y's) and Diffrax's
# ImplicitAdjoint with a Krylov solver reach it. Now a ValueError naming the
# structures (lineax 0.1.1 refuses it too).
def test_krylov_on_equal_size_different_structures_solves_or_says_so():
    with _EnableX64():
        matrix = 2 * jnp.eye(3) + 0.1
        in_structure = {
            "a": jax.ShapeDtypeStruct((2,), jnp.float64),
            "b": jax.ShapeDtypeStruct((), jnp.float64),
        }

        def mv(x):
            w = matrix @ jnp.concatenate([x["a"], x["b"][None]])
            return (w[:1], w[1:])

        operator = lx.FunctionLinearOperator(mv, in_structure)
        vector = (jnp.ones(1), jnp.ones(2))
        expected = np.linalg.solve(np.asarray(matrix), np.ones(3))
        for solver in [lx.GMRES(1e-10, 1e-10), lx.BiCGStab(1e-10, 1e-10)]:
            try:
                value = lx.linear_solve(operator, vector, solver).value
            except ValueError as error:
                assert "structure" in str(error) or "square" in str(error), error
            else:
                flat = np.concatenate([value["a"], value["b"][None]])
                np.testing.assert_allclose(flat, expected, rtol=1e-8)


# Newton's right-hand side (the nonlinear residual) falls below the Krylov solver's
# `atol` near the root. One GMRES step from there (all the tolerance asked for) on
# the stiff Robertson Jacobian hardly lowered the residual, so Newton stalled at the
# linear solver's `atol`, above its own: Diffrax's ImplicitEuler failed at t = 0.052
# ("maximum number of steps in the nonlinear solver"; Kvaerno5 over [0, 0.1] took
# 20 steps). Now such a solve aims at `rtol` relative to its initial residual, and
# the step counts are those of lineax 0.1.1 (measured with it: 94 steps here).
def test_diffrax_robertson_with_gmres_newton_takes_published_step_count():
    dfx = pytest.importorskip("diffrax")
    with _EnableX64():

        def robertson(t, y, args):
            y1, y2, y3 = y
            return jnp.stack(
                [
                    -0.04 * y1 + 1e4 * y2 * y3,
                    0.04 * y1 - 3e7 * y2**2 - 1e4 * y2 * y3,
                    3e7 * y2**2,
                ]
            )

        gmres = lx.GMRES(rtol=1e-7, atol=1e-7)
        newton = optx.Newton(rtol=1e-8, atol=1e-8, linear_solver=gmres)
        sol = dfx.diffeqsolve(
            dfx.ODETerm(robertson),
            dfx.ImplicitEuler(root_finder=newton),
            0.0,
            0.1,
            1e-4,
            jnp.array([1.0, 0.0, 0.0]),
            stepsize_controller=dfx.PIDController(rtol=1e-4, atol=1e-8),
            max_steps=400,
            throw=False,
        )
        assert sol.result == dfx.RESULTS.successful
        assert int(sol.stats["num_steps"]) <= 104  # lineax 0.1.1: 94
        np.testing.assert_allclose(
            sol.ys[-1], [0.9960818, 3.580511e-5, 3.882388e-3], rtol=1e-5
        )


# Least squares in float32 with cond ~1e5 (an exponential fit with badly scaled
# parameters) and LSMR at rtol 1e-6: the true ||A^H r|| / (||A|| ||r||) cannot
# get below ~eps cond(A) = 1e-3 there, so LSMR reported `stagnation` on an answer
# right to 2e-5 and Gauss-Newton aborted at its first step. lineax 0.1.1 (which
# tests LSMR's estimates) converges in 6 steps; so does this package now.
def test_optimistix_gauss_newton_lsmr_float32_badly_scaled_fit():
    t = jnp.linspace(0.0, 100.0, 60, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    clean = 1000.0 * np.exp(-0.03 * np.asarray(t)) + 5.0
    data = jnp.asarray(clean + rng.normal(0, 1.0, t.shape), jnp.float32)

    def residual(p, args):
        a, b, c = p
        return a * jnp.exp(-b * t) + c - data

    solver = optx.GaussNewton(
        rtol=1e-5, atol=1e-5, linear_solver=lx.LSMR(rtol=1e-6, atol=1e-6)
    )
    p0 = jnp.array([800.0, 0.02, 1.0], jnp.float32)
    sol = optx.least_squares(residual, solver, p0, throw=False, max_steps=50)
    assert sol.result == optx.RESULTS.successful
    assert int(sol.stats["num_steps"]) <= 8  # lineax 0.1.1: 6
    # The float64 least-squares fit (lineax 0.1.1's float32 fit is 2.4e-3 from it,
    # in the offset; so is this one).
    np.testing.assert_allclose(sol.value, [999.3793, 0.03005575, 5.765056], rtol=5e-3)


def test_lsmr_condition_estimate_of_a_gauss_newton_jacobian():
    # Gauss-Newton on this fit (float64, from (1, 1, 0)) reaches, at its fourth
    # step, a Jacobian of condition number 9.1e7: below LSMR's `conlim` of 1e8.
    # LSMR's estimate of cond(A) let the initial `rhobar = 1` into its maximum;
    # with the operator scaled to a norm near 1 that made the estimate 1.0007e8
    # (SciPy's: 9.09e7), and the solve stopped with `conlim` (Optimistix's
    # `GaussNewton` with this LSMR then failed; lineax 0.1.1: successful).
    with _EnableX64():
        t = np.linspace(0.0, 1e4, 30)
        data = 3e4 * np.exp(-2e-4 * t) + 0.7

        def residual_and_jacobian(p):
            a, k, c = p
            e = np.exp(-k * 1e-4 * t)
            jac = np.stack([e, -a * t * 1e-4 * e, 1e-4 * np.ones_like(t)], axis=1)
            return (a * 1e4 * e + c - data) * 1e-4, jac

        p = np.array([1.0, 1.0, 0.0])
        for _ in range(3):
            r, jac = residual_and_jacobian(p)
            p = p - np.linalg.lstsq(jac, r)[0]
        r, jac = residual_and_jacobian(p)
        assert 8e7 < np.linalg.cond(jac) < 1e8
        solver = lx.LSMR(rtol=1e-10, atol=1e-10, max_steps=50)
        operator = lx.MatrixLinearOperator(jnp.asarray(jac))
        sol = lx.linear_solve(operator, jnp.asarray(r), solver, throw=False)
        assert sol.result == lx.RESULTS.successful
        np.testing.assert_allclose(sol.value, np.linalg.lstsq(jac, r)[0], rtol=1e-6)


# The same fit with JAX's Jacobian, as Optimistix makes it: at its fourth
# Gauss-Newton step (cond 9.1e7) LSMR at rtol 1e-8 to 1e-12 stopped with
# `stagnation` under the tests' XLA flags, with an answer right to 2e-11 (SciPy's
# `lsmr`: 1e-11), and `GaussNewton` failed at that step. Its ||A^H r|| / (||A||
# ||r||) stayed at 1.2e-6: the iterate's own rounding, eps ||y|| in every
# direction, times ||A||^2, with ||A|| ||y|| = 8e9 ||r|| (the least-squares
# solution perturbed at random by eps ||y|| reads 1e-6 too), not below
# `10 eps cond(A)` = 2e-7. (lineax 0.1.1 converges in 14 steps at rtol 1e-12.)
def test_optimistix_gauss_newton_lsmr_at_the_rounding_of_the_iterate():
    with _EnableX64():
        t = jnp.linspace(0.0, 1e4, 30)
        data = 3e4 * jnp.exp(-2e-4 * t) + 0.7

        def residual(p, args):
            a, k, c = p
            return (a * 1e4 * jnp.exp(-k * 1e-4 * t) + c - data) * 1e-4

        linear_solver = lx.LSMR(rtol=1e-12, atol=1e-12, max_steps=50)
        solver = optx.GaussNewton(rtol=1e-10, atol=1e-10, linear_solver=linear_solver)
        p0 = jnp.array([1.0, 1.0, 0.0])
        sol = optx.least_squares(residual, solver, p0, max_steps=30, throw=False)
        assert sol.result == optx.RESULTS.successful
        np.testing.assert_allclose(sol.value, [3.0, 2.0, 0.7], rtol=1e-8)

        p = p0
        for _ in range(3):
            jac = np.asarray(jax.jacfwd(residual)(p, None))
            p = p - np.linalg.lstsq(jac, np.asarray(residual(p, None)))[0]
        r, jac = residual(p, None), jax.jacfwd(residual)(p, None)
        assert 8e7 < np.linalg.cond(jac) < 1e8
        operator = lx.MatrixLinearOperator(jac)
        sol = lx.linear_solve(operator, r, linear_solver, throw=False)
        assert sol.result == lx.RESULTS.successful
        expected = np.linalg.lstsq(np.asarray(jac), np.asarray(r))[0]
        # (Normwise: eps cond(A) = 2e-8. The small component `k` is right to 3e-7.)
        error = np.linalg.norm(np.asarray(sol.value) - expected)
        assert error <= 1e-8 * np.linalg.norm(expected)


# Optimistix differentiates a least-squares fit implicitly: a linear solve with
# the Hessian-like operator of the fit (through lineax) at the solution. For a
# linear model r(x) = A x - b the fit is pinv(A) b, so d x / d b = pinv(A), here
# with columns scaled 1e3, 1, 1e-3 (cond ~ 1e6), in both modes.
def test_optimistix_least_squares_implicit_jacobian_badly_scaled():
    with _EnableX64():
        rng = np.random.default_rng(0)
        a = jnp.asarray(rng.normal(size=(8, 3)) * np.array([1e3, 1.0, 1e-3]))
        b = jnp.asarray(rng.normal(size=8))
        pinv = np.linalg.pinv(np.asarray(a))

        def residual(x, b):
            return a @ x - b

        for linear_solver in [lx.QR(), lx.LSMR(rtol=1e-12, atol=1e-12)]:
            solver = optx.LevenbergMarquardt(
                rtol=1e-12, atol=1e-12, linear_solver=linear_solver
            )

            def fit(b, solver=solver):
                sol = optx.least_squares(
                    residual, solver, jnp.zeros(3), args=b, max_steps=100, throw=False
                )
                return sol.value

            reverse = jax.jacrev(fit)(b)
            forward = jax.jacfwd(fit)(b)
            np.testing.assert_allclose(reverse, pinv, rtol=1e-8, atol=1e-12)
            np.testing.assert_allclose(forward, pinv, rtol=1e-8, atol=1e-12)


# `vmap` of `grad` through root finds whose unknowns are a dict, with a Krylov
# solver in the Newton steps and in the implicit (transposed) solve: the gradient
# matches central differences (lineax 0.1.1 gives the same values and steps).
def test_optimistix_vmap_grad_root_find_pytree_gmres():
    with _EnableX64():

        def fn(y, a):
            return {
                "p": y["p"] ** 3 + y["q"] - a,
                "q": jnp.sin(y["q"]) + 2 * y["q"] - a * y["p"],
            }

        gmres = lx.GMRES(rtol=1e-12, atol=1e-12)
        solver = optx.Newton(rtol=1e-12, atol=1e-12, linear_solver=gmres)
        y0 = {"p": jnp.array(1.0), "q": jnp.array(0.0)}

        def root(a):
            sol = optx.root_find(fn, solver, y0, args=a, max_steps=50, throw=False)
            return sol.value["p"], sol.result == optx.RESULTS.successful

        a = jnp.array([0.5, 1.0, 3.0])
        _, ok = jax.vmap(root)(a)
        assert bool(jnp.all(ok))
        grads = jax.vmap(jax.grad(lambda a: root(a)[0]))(a)
        eps = 1e-6
        fd = (jax.vmap(root)(a + eps)[0] - jax.vmap(root)(a - eps)[0]) / (2 * eps)
        np.testing.assert_allclose(grads, fd, rtol=1e-7)
        want = [0.43597532, 0.25818964, 0.08461108]
        np.testing.assert_allclose(grads, want, rtol=1e-7)


# Optimistix's Newton and Diffrax's VeryChord solve with a function operator (the
# linearised residual) and `throw=False`, Diffrax reusing the LU state of `init`.
# The operator's function belongs in the program once, where `init` materialises
# its matrix: the test of the inputs of a failed solve used to evaluate it a
# second time on a probe (a copy of the user's linearised function in every
# Newton loop: Kvaerno5 on Robertson lowered to 1763 StableHLO operations, now
# 1721; 0.1.1: 1542). `init` has tested that matrix already.
def test_function_operator_is_evaluated_once_per_throw_false_solve():
    def linear_fn(v):
        return 3.0 * v + jnp.cumsum(v)  # `cumsum`: its mark in the program

    solver = lx.AutoLinearSolver(well_posed=None)
    struct = jax.ShapeDtypeStruct((4,), jnp.float32)

    def newton_step(b):
        operator = lx.FunctionLinearOperator(linear_fn, struct)
        return lx.linear_solve(operator, b, solver, throw=False)

    def chord_step(b):
        operator = lx.FunctionLinearOperator(linear_fn, struct)
        state = solver.init(operator, {})
        return lx.linear_solve(operator, b, solver, state=state, throw=False)

    def bare_solve(b):  # the solver's own conditionals, if any
        operator = lx.FunctionLinearOperator(linear_fn, struct)
        return solver.compute(solver.init(operator, {}), b, {})[0]

    b = jnp.arange(1.0, 5.0, dtype=jnp.float32)
    bare = jax.jit(bare_solve).lower(b).as_text()
    for step in (newton_step, chord_step):
        # (XLA:CPU lowers `cumsum` to one `reduce_window`.)
        program = jax.jit(step).lower(b).as_text()
        assert program.count("stablehlo.reduce_window") == 1, step.__name__
        # No conditional around the test of the inputs either: in a vmapped
        # Newton loop it changed the step counts (see the next test).
        cases = program.count("stablehlo.case")
        assert cases == bare.count("stablehlo.case"), step.__name__
        sol = jax.jit(step)(b)
        assert sol.result == lx.RESULTS.successful
        np.testing.assert_allclose(
            3.0 * sol.value + jnp.cumsum(sol.value), b, rtol=1e-5
        )
    # A non-finite matrix is still reported as such (by `init`'s test).
    bad = lx.FunctionLinearOperator(lambda v: v.at[0].multiply(jnp.inf), struct)
    sol = jax.jit(lambda b: lx.linear_solve(bad, b, solver, throw=False))(b)
    assert sol.result == lx.RESULTS.nonfinite_input


# A vmapped Kvaerno5 on Robertson in float32 (Diffrax's VeryChord reuses an LU
# state and solves with `throw=False`), at XLA's default flags, as users run it
# (the test run's flags compile it differently: see conftest.py). With a
# conditional test of the inputs in each of those solves, one of these 40
# initial values ran to `max_steps` (20000), and over 480 initial values the
# steps were 60139 (at most 258 for another); lineax 0.1.1 takes at most 124
# here, 36302 over the 480, and this package now 123 and 35780. Unbatched, the
# step counts were always equal.
def test_diffrax_vmap_kvaerno5_robertson_float32_step_counts():
    pytest.importorskip("diffrax")
    code = textwrap.dedent(
        """
        import diffrax as dfx
        import jax
        import jax.numpy as jnp
        import numpy as np

        def robertson(t, y, args):
            y1, y2, y3 = y
            return jnp.stack(
                [
                    -0.04 * y1 + 1e4 * y2 * y3,
                    0.04 * y1 - 3e7 * y2**2 - 1e4 * y2 * y3,
                    3e7 * y2**2,
                ]
            )

        def solve(y0):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(robertson), dfx.Kvaerno5(), 0.0, 1e3, 1e-6, y0,
                stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-6),
                max_steps=20000, throw=False,
            )
            return sol.stats["num_steps"], sol.result == dfx.RESULTS.successful

        rng = np.random.default_rng(7)
        for _ in range(5):
            y1 = rng.uniform(0.3, 1.0, 40)
        y0 = np.stack([y1, np.zeros(40), 1 - y1], axis=1).astype(np.float32)
        steps, ok = jax.jit(jax.vmap(solve))(jnp.asarray(y0))
        print(bool(ok.all()), int(steps.max()), int(steps.sum()))
        """
    )
    from conftest import run_at_default_flags

    completed = run_at_default_flags(code)
    assert completed.returncode == 0, completed.stderr[-3000:]
    ok, most, total = completed.stdout.split()[-3:]
    assert ok == "True" and int(most) <= 200 and int(total) <= 3200, (ok, most, total)


def _readers(jaxpr, variable) -> list[str]:
    """The primitives of `jaxpr` that read `variable` and whose outputs its
    outputs need, last first."""

    def variables(atoms):  # (not the literals)
        return [v for v in atoms if type(v).__name__ != "Literal"]

    needed = set(variables(jaxpr.outvars))
    readers = []
    for eqn in reversed(jaxpr.eqns):
        if any(v in needed for v in eqn.outvars):
            inputs = variables(eqn.invars)
            needed.update(inputs)
            if variable in inputs:
                readers.append(eqn.primitive.name)
    return readers


# Diffrax's ImplicitEuler refactorises a function operator (the linearised
# vector field) every step. LU's `init` tested the finiteness of the matrix
# rather than of its factors: a second reader of the matrix, for which XLA
# recomputed the function operator's matrix (n = 100, 1978 steps: 196 ms, now
# 172 ms; 0.1.1: 159 ms). A non-finite entry of `A` stays non-finite in `LU`.
# (A `MatrixLinearOperator`'s own matrix is tested instead, which is no
# recomputation: see `test_review_direct_passes`.)
def test_lu_init_tests_finiteness_of_the_factors_not_the_matrix():
    struct = jax.ShapeDtypeStruct((3,), jnp.float32)

    def finite(matrix):
        operator = lx.FunctionLinearOperator(lambda v: matrix @ v, struct)
        return lx.LU().init(operator, {}).finite

    jaxpr = jax.make_jaxpr(finite)(jnp.eye(3, dtype=jnp.float32)).jaxpr
    # The function operator's matrix: what the factorisation reads.
    ((materialised, *_),) = [e.invars for e in jaxpr.eqns if e.primitive.name == "lu"]
    readers = _readers(jaxpr, materialised)
    assert readers == ["lu"], readers

    # Every position of a NaN or an inf is still reported, through a function
    # operator too (whose only test is `init`'s).
    solver = lx.AutoLinearSolver(well_posed=None)
    base = jnp.array([[4.0, 1.0, 0.5], [1.0, 3.0, 1.0], [0.5, 1.0, 2.0]], jnp.float32)

    @jax.jit
    def solve(a):
        operator = lx.FunctionLinearOperator(lambda v: a @ v, struct)
        b = jnp.ones(3, jnp.float32)
        return lx.linear_solve(operator, b, solver, throw=False).result

    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        for i in range(3):
            for j in range(3):
                result = solve(base.at[i, j].set(bad))
                assert result == lx.RESULTS.nonfinite_input, (bad, i, j)


# Optimistix's GaussNewton and LevenbergMarquardt factorise a Jacobian (a
# function operator's matrix) with QR. Its `init` tested the finiteness of the
# matrix rather than of the Householder factors: a second reader of the matrix,
# for which XLA recomputed the Jacobian in the test's kernel (GaussNewton, 4
# parameters and 30 residuals: 363 -> 327 optimised HLO instructions, the
# Jacobian's `sin` and `cos` once, as in lineax 0.1.1). A non-finite entry of
# `A` stays non-finite in the factors, wherever it is, tall, wide or square, and
# through LAPACK's blocked `geqrf` (128 columns and more).
@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4)], ids=str)
def test_qr_init_tests_finiteness_of_the_factors_not_the_matrix(shape):
    m, n = shape
    struct = jax.ShapeDtypeStruct((n,), jnp.float32)

    def finite(matrix):
        operator = lx.FunctionLinearOperator(lambda v: matrix @ v, struct)
        return lx.QR().init(operator, {}).finite

    jaxpr = jax.make_jaxpr(finite)(jnp.ones(shape, jnp.float32)).jaxpr
    # The function operator's matrix (of a wide one, its conjugate transpose),
    # with its gradient stopped: what the factorisation reads.
    ((materialised,),) = [
        e.invars for e in jaxpr.eqns if e.primitive.name == "stop_gradient"
    ]
    readers = _readers(jaxpr, materialised)
    assert readers == ["stop_gradient"], readers

    # Every position of a NaN or an inf is still reported, through a function
    # operator (whose only test is `init`'s): the record, and the solve.
    rng = np.random.default_rng(0)
    base = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    b = jnp.ones(m, jnp.float32)

    @jax.jit
    def solve(a):
        operator = lx.FunctionLinearOperator(lambda v: a @ v, struct)
        return lx.linear_solve(operator, b, lx.QR(), throw=False).result

    bad = jnp.stack(
        [
            base.at[i, j].set(value)
            for value in (jnp.nan, jnp.inf, -jnp.inf)
            for i in range(m)
            for j in range(n)
        ]
    )
    assert not jax.jit(jax.vmap(finite))(bad).any()
    assert jax.jit(jax.vmap(finite))(base[None]).all()
    for a in bad:
        assert solve(a) == lx.RESULTS.nonfinite_input


def test_qr_init_tests_finiteness_of_blocked_factors():
    # LAPACK's `geqrf` factorises panels and updates the trailing columns with
    # block reflectors (matrix products) from 128 columns on.
    m, n = 160, 130
    struct = jax.ShapeDtypeStruct((n,), jnp.float32)

    @jax.jit
    @jax.vmap
    def finite(matrix):
        operator = lx.FunctionLinearOperator(lambda v: matrix @ v, struct)
        return lx.QR().init(operator, {}).finite

    base = jnp.asarray(np.random.default_rng(1).standard_normal((m, n)), jnp.float32)
    places = [(0, 0), (5, 0), (0, 40), (100, 40), (31, 31), (40, 33), (159, 129)]
    places += [(129, 129), (0, 129), (70, 100), (150, 65)]
    bad = jnp.stack(
        [
            base.at[i, j].set(value)
            for value in (jnp.nan, jnp.inf, -jnp.inf)
            for i, j in places
        ]
    )
    assert not finite(bad).any()
    assert finite(base[None]).all()


# Chord-type root finders factorise the Jacobian once and keep the linear
# solver's state across steps through `lax.stop_gradient` (Optimistix's Chord;
# Diffrax's VeryChord, the default root finder of its implicit solvers). With
# `lx.Normal(lx.Cholesky())` that state held the linearised Jacobian, a function
# operator with a jaxpr inside, which `stop_gradient` refused ("not a valid JAX
# type") at trace time; lineax 0.1.1 runs both (Kvaerno5: 28 steps here, as now).
# With a Krylov solver (whose state is the operator) both failed, in lineax 0.1.1
# too; they run now, and Diffrax's re-linearisation at a later stage gives a state
# equal to the kept one, as it asserts.
@pytest.mark.parametrize(
    "normal",
    [lx.Normal(lx.Cholesky()), lx.GMRES(1e-10, 1e-10)],
    ids=["normal_cholesky", "gmres"],
)
def test_chord_root_finders_keep_the_linear_solver_state(normal):
    dfx = pytest.importorskip("diffrax")
    with _EnableX64():

        def fn(y, a):
            return jnp.stack(
                [y[0] ** 3 + y[1] - a, jnp.sin(y[1]) + 2 * y[1] - a * y[0]]
            )

        chord = optx.Chord(rtol=1e-10, atol=1e-10, linear_solver=normal)
        sol = optx.root_find(fn, chord, jnp.array([1.0, 0.0]), args=2.0)
        assert sol.result == optx.RESULTS.successful
        assert float(jnp.max(jnp.abs(fn(sol.value, 2.0)))) < 1e-10

        def vector_field(t, y, args):
            return jnp.stack([-1000.0 * (y[0] - jnp.cos(t)), y[0] - y[1]])

        sol = dfx.diffeqsolve(
            dfx.ODETerm(vector_field),
            dfx.Kvaerno5(
                root_finder=dfx.VeryChord(rtol=1e-8, atol=1e-8, linear_solver=normal)
            ),
            0.0,
            1.0,
            1e-3,
            jnp.array([0.0, 0.0]),
            stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-8),
        )
        assert sol.result == dfx.RESULTS.successful
        assert int(sol.stats["num_steps"]) <= 32
        # y0 = (1e6 cos t + 1e3 sin t - 1e6 exp(-1000 t)) / (1e6 + 1) exactly.
        want = (1e6 * np.cos(1.0) + 1e3 * np.sin(1.0)) / (1e6 + 1)
        np.testing.assert_allclose(sol.ys[-1][0], want, rtol=1e-5)
