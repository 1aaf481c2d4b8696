"""Tests of the Krylov solvers: CG, MINRES, GMRES, BiCGStab, LSMR, Normal(CG).

Accuracy against NumPy on small problems (real, complex, PyTree-structured),
convergence and iteration counts against `scipy.sparse.linalg` on the 2-D Poisson
and convection-diffusion operators and on dense least squares, preconditioning,
differentiation, `vmap`, result codes and argument checks.
"""

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from helpers import (
    KRYLOV_CASES,
    make_matrix,
    pinv_solution,
    psd,
    round_to,
    sample,
    SHAPES,
)

import lineax as lx


two_norm = lx.internal.two_norm


def _rng(seed=0):
    return np.random.default_rng(seed)


def _problems(n=12, seed=0):
    rng = _rng(seed)
    a = rng.normal(size=(n, n))
    return {
        "spd": a @ a.T + n * np.eye(n),
        "sym": a + a.T,
        "nonsym": a + 2 * np.sqrt(n) * np.eye(n),
    }


_SQUARE_CASES = [c for c in KRYLOV_CASES if len(set(SHAPES[c.matrix_kind])) == 1]


# Each case in one of the two dtypes, alternating (a fixed-seed slice of the two;
# both with LINEAX_EXHAUSTIVE=1): each compiles a solve of its own.
@pytest.mark.parametrize(
    "case, dtype",
    [
        pytest.param(case, dtype, id=f"{jnp.dtype(dtype).name}-{case.name}")
        for i, case in enumerate(_SQUARE_CASES)
        for dtype in sample([jnp.float64, jnp.float32], i % 2)
    ],
)
def test_small_square(case, dtype):
    """The square Krylov cases of the shared table, at n = 12, against NumPy
    (LSMR on rectangular matrices: `test_lsmr_shapes_and_damp`)."""
    matrix = make_matrix(case.matrix_kind, dtype, size=12)
    b = round_to(_rng(1).normal(size=matrix.shape[0]), dtype)
    tol = 1e-10 if dtype == jnp.float64 else 1e-5
    op = lx.MatrixLinearOperator(jnp.asarray(matrix, dtype), case.tags)
    sol = lx.linear_solve(op, jnp.asarray(b, dtype), case.with_tolerance(tol))
    assert sol.result == lx.RESULTS.successful
    assert sol.value.dtype == dtype
    expected = pinv_solution(matrix, b, dtype)
    scale = np.linalg.cond(matrix) * (10 if case.name.startswith("normal") else 1)
    np.testing.assert_allclose(sol.value, expected, rtol=0, atol=50 * tol * scale)
    assert set(sol.stats) == {
        "num_steps",
        "max_steps",
        "num_mv",
        "residual_norm",
        "residual_history",
    }
    assert 0 < int(sol.stats["num_steps"]) <= int(sol.stats["max_steps"])
    # (Restarted GMRES: 10 n cycles of `min(restart, n)` steps, 0.1.1's budget.)
    n = matrix.shape[0]
    cycle = min(case.solver.restart, n) if hasattr(case.solver, "restart") else 1
    assert int(sol.stats["max_steps"]) == 10 * n * cycle


def _complex_problems(n=10):
    rng = _rng(2)
    a = rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))
    return {
        "hpd": a @ a.conj().T + n * np.eye(n),
        "nonsym": a + 3 * np.sqrt(n) * np.eye(n),
    }


_COMPLEX_CASES = [
    ("CG", lambda t: lx.CG(t, t), "hpd", psd),
    ("MINRES", lambda t: lx.MINRES(t, t), "hpd", psd),
    ("GMRES", lambda t: lx.GMRES(t, t, restart=4), "nonsym", ()),
    ("BiCGStab", lambda t: lx.BiCGStab(t, t), "nonsym", ()),
    # The core's `two_norm` rejects complex input under strict dtype promotion.
    ("LSMR", lambda t: lx.LSMR(t, t, norm=lx.internal.max_norm), "nonsym", ()),
]


# CG and BiCGStab (default tolerances, complex128, a general or Hermitian definite
# matrix) run with LINEAX_EXHAUSTIVE=1 only: the default run solves the same
# against NumPy in test_review_krylov_complex.py (its sample takes complex128 for
# those two); GMRES here restarts, LSMR has its own norm, and MINRES runs there in
# complex64 only.
_COMPLEX_ALSO_IN_REVIEW = ("CG", "BiCGStab")


@pytest.mark.parametrize(
    "name,make,kind,tags",
    [
        pytest.param(
            *c,
            id=c[0],
            marks=[pytest.mark.exhaustive] if c[0] in _COMPLEX_ALSO_IN_REVIEW else [],
        )
        for c in _COMPLEX_CASES
    ],
)
def test_complex128(name, make, kind, tags):
    matrix = _complex_problems()[kind]
    rng = _rng(3)
    b = rng.normal(size=matrix.shape[0]) + 1j * rng.normal(size=matrix.shape[0])
    op = lx.MatrixLinearOperator(jnp.asarray(matrix, jnp.complex128), tags)
    sol = lx.linear_solve(op, jnp.asarray(b, jnp.complex128), make(1e-11))
    assert sol.result == lx.RESULTS.successful
    np.testing.assert_allclose(sol.value, np.linalg.solve(matrix, b), atol=1e-8)


@pytest.mark.parametrize(
    "make,tags",
    [
        (lambda: lx.CG(1e-10, 1e-10), psd),
        (lambda: lx.MINRES(1e-10, 1e-10), lx.symmetric_tag),
        (lambda: lx.GMRES(1e-10, 1e-10, restart=4), ()),
        (lambda: lx.BiCGStab(1e-10, 1e-10), ()),
        (lambda: lx.LSMR(1e-10, 1e-10), ()),
    ],
    ids=["CG", "MINRES", "GMRES", "BiCGStab", "LSMR"],
)
def test_pytree_operator(make, tags):
    # Input and output: {"a": (2,), "b": (3,)}, i.e. a 5x5 SPD matrix in blocks.
    matrix = _problems(5)["spd"]
    split = {"a": slice(0, 2), "b": slice(2, 5)}
    blocks = {
        i: {j: jnp.asarray(matrix[split[i], split[j]]) for j in split} for i in split
    }
    struct = {
        "a": jax.ShapeDtypeStruct((2,), jnp.float64),
        "b": jax.ShapeDtypeStruct((3,), jnp.float64),
    }
    op = lx.PyTreeLinearOperator(blocks, struct, tags)
    b = _rng(4).normal(size=5)
    vector = {"a": jnp.asarray(b[:2]), "b": jnp.asarray(b[2:])}
    sol = lx.linear_solve(op, vector, make())
    assert sol.result == lx.RESULTS.successful
    expected = np.linalg.solve(matrix, b)
    np.testing.assert_allclose(sol.value["a"], expected[:2], atol=1e-8)
    np.testing.assert_allclose(sol.value["b"], expected[2:], atol=1e-8)


def test_lsmr_shapes_and_damp():
    rng = _rng(5)
    tall = rng.normal(size=(30, 10))
    wide = tall.T
    rank_def = tall.copy()
    rank_def[:, 3] = rank_def[:, 4]
    b30 = rng.normal(size=30)
    b10 = rng.normal(size=10)
    solver = lx.LSMR(1e-10, 1e-10)
    for matrix, b in ((tall, b30), (wide, b10), (rank_def, b30)):
        sol = lx.linear_solve(
            lx.MatrixLinearOperator(jnp.asarray(matrix)), jnp.asarray(b), solver
        )
        assert sol.result == lx.RESULTS.successful
        np.testing.assert_allclose(sol.value, np.linalg.pinv(matrix) @ b, atol=1e-7)
    damp = 0.7
    sol = lx.linear_solve(
        lx.MatrixLinearOperator(jnp.asarray(tall)),
        jnp.asarray(b30),
        solver,
        options={"damp": jnp.asarray(damp)},
    )
    expected = np.linalg.solve(tall.T @ tall + damp**2 * np.eye(10), tall.T @ b30)
    assert sol.result == lx.RESULTS.successful
    np.testing.assert_allclose(sol.value, expected, atol=1e-8)


def test_damped_lsmr_solution_is_a_valid_jit_output():
    # The damped operator `[A; damp I]` was a closure-converted function, whose
    # jaxpr LSMR's state kept: `jax.jit` of a function returning the `Solution`
    # raised JAX's "not a valid JAX type" (the published package, which ignores
    # `damp`, returns it). A Python-float `damp` and the returned state reused.
    rng = _rng(6)
    tall = jnp.asarray(rng.normal(size=(12, 4)))
    b = jnp.asarray(rng.normal(size=12))
    solver = lx.LSMR(1e-10, 1e-10)

    @jax.jit
    def solve(matrix, vector):
        operator = lx.MatrixLinearOperator(matrix)
        return lx.linear_solve(operator, vector, solver, options={"damp": 0.5})

    sol = solve(tall, b)
    expected = np.linalg.solve(tall.T @ tall + 0.25 * np.eye(4), tall.T @ b)
    assert sol.result == lx.RESULTS.successful
    np.testing.assert_allclose(sol.value, expected, atol=1e-8)
    again = jax.jit(
        lambda state, vector: (
            lx.linear_solve(
                lx.MatrixLinearOperator(tall),
                vector,
                solver,
                state=state,
                options={"damp": 0.5},
            ).value
        )
    )(sol.state, 2 * b)
    np.testing.assert_allclose(again, 2 * expected, atol=1e-8)


#
# Large problems: convergence, the true residual, and iteration counts vs SciPy.
#


def _stencil(u, conv):
    p = jnp.pad(u, 1)
    out = (4.05 + conv) * u - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:]
    if conv:
        out = out - conv * p[:-2, 1:-1]
    return out


def _sparse(k, conv):
    eye = sp.identity(k)
    # SciPy leaves `offsets` unannotated: pyright types it by its default `0`.
    lap = sp.diags([-1, 2, -1], [-1, 0, 1], shape=(k, k), dtype=float)  # pyright: ignore[reportArgumentType]
    out = sp.kron(lap, eye) + sp.kron(eye, lap) + 0.05 * sp.identity(k * k)
    if conv:
        out = out + conv * sp.kron(
            # (`offsets`: as above.)
            sp.diags([-1, 1], [-1, 0], shape=(k, k), dtype=float),  # pyright: ignore[reportArgumentType]
            eye,
        )
    return out.tocsr()


def _scipy_count(name, matrix, b, rtol):
    count = [0]
    hit: list[int | None] = [None]

    def callback(*args):
        count[0] += 1

    maxiter = 10 * matrix.shape[0]
    if name == "CG":
        spla.cg(matrix, b, rtol=rtol, atol=0, maxiter=maxiter, callback=callback)
    elif name == "BiCGStab":
        spla.bicgstab(matrix, b, rtol=rtol, atol=0, maxiter=maxiter, callback=callback)
    elif name == "GMRES":
        spla.gmres(
            matrix, b, rtol=rtol, atol=0, restart=20, maxiter=maxiter,
            callback=callback, callback_type="pr_norm",
        )  # fmt: skip
    else:
        # SciPy's MINRES stops on a backward-error test (||r|| / (||A|| ||x|| +
        # ||b||)), which is looser than ours: count the steps until the true
        # residual passes our rule instead.
        bnorm = np.linalg.norm(b)

        def minres_callback(x):
            count[0] += 1
            if hit[0] is None and np.linalg.norm(b - matrix @ x) <= rtol * bnorm:
                hit[0] = count[0]

        spla.minres(matrix, b, rtol=1e-15, maxiter=maxiter, callback=minres_callback)
        assert hit[0] is not None, "SciPy's MINRES never met our stopping rule"
        return hit[0]
    return count[0]


_LARGE = [
    ("CG", lx.CG, 0.0),
    ("MINRES", lx.MINRES, 0.0),
    ("GMRES", lx.GMRES, 1.0),
    ("BiCGStab", lx.BiCGStab, 1.0),
]


def _large_case(name, solver_cls, conv, k, dtype):
    rtol = 1e-10 if dtype == jnp.float64 else 1e-5
    tags = psd if conv == 0 else ()
    op = lx.FunctionLinearOperator(
        lambda u: _stencil(u, conv), jax.ShapeDtypeStruct((k, k), dtype), tags
    )
    b = _rng(6).normal(size=(k, k))
    solver = solver_cls(rtol, 0.0, norm=two_norm)
    sol = eqx.filter_jit(lambda v: lx.linear_solve(op, v, solver, throw=False))(
        jnp.asarray(b, dtype)
    )
    assert sol.result == lx.RESULTS.successful
    matrix = _sparse(k, conv)
    b_used = np.asarray(jnp.asarray(b, dtype), np.float64).ravel()
    residual = b_used - matrix @ np.asarray(sol.value, np.float64).ravel()
    # The stopping rule, on a residual recomputed in float64 (with float32 rounding
    # of the solution allowed for).
    slack = 1.0 if dtype == jnp.float64 else 1.5
    assert np.linalg.norm(residual) <= slack * rtol * np.linalg.norm(b_used)
    np_dtype = np.float64 if dtype == jnp.float64 else np.float32
    ours = int(sol.stats["num_steps"])
    theirs = _scipy_count(name, matrix.astype(np_dtype), b_used.astype(np_dtype), rtol)
    assert abs(ours - theirs) <= max(1, 0.1 * theirs), (ours, theirs)


@pytest.mark.parametrize("name,solver_cls,conv", _LARGE, ids=[c[0] for c in _LARGE])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_poisson_vs_scipy(name, solver_cls, conv, dtype):
    _large_case(name, solver_cls, conv, 64, dtype)


@pytest.mark.exhaustive
@pytest.mark.parametrize("k", [256, 1024])
@pytest.mark.parametrize("name,solver_cls,conv", _LARGE, ids=[c[0] for c in _LARGE])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_poisson_vs_scipy_large(name, solver_cls, conv, k, dtype):
    _large_case(name, solver_cls, conv, k, dtype)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_lsmr_tall_dense_vs_scipy(dtype):
    rtol = 1e-10 if dtype == jnp.float64 else 1e-5
    rng = _rng(7)
    matrix = rng.normal(size=(300, 100)) @ np.diag(np.logspace(0, 1, 100))
    b = rng.normal(size=300)
    np_dtype = np.float64 if dtype == jnp.float64 else np.float32
    op = lx.MatrixLinearOperator(jnp.asarray(matrix, dtype))
    sol = lx.linear_solve(op, jnp.asarray(b, dtype), lx.LSMR(rtol, 0.0), throw=False)
    assert sol.result == lx.RESULTS.successful
    # Inconsistent system: the normal-equations rule holds on the true residual.
    x = np.asarray(sol.value, np.float64)
    r = b - matrix @ x
    fro = np.linalg.norm(matrix)
    assert np.linalg.norm(matrix.T @ r) <= 2 * rtol * fro * np.linalg.norm(r)
    expected = np.linalg.lstsq(matrix, b, rcond=None)[0]
    np.testing.assert_allclose(
        x, expected, rtol=0, atol=1e3 * rtol * np.abs(expected).max()
    )
    with np.errstate(over="ignore"):
        theirs = spla.lsmr(
            matrix.astype(np_dtype),
            b.astype(np_dtype),
            atol=rtol,
            btol=rtol,
            maxiter=3000,
        )[2]
    ours = int(sol.stats["num_steps"])
    # Our normal-equations test uses a lower bound on ||A||_2, SciPy an estimate
    # of ||A||_F that can pass too early (see `LSMR`): up to 30% more steps.
    assert theirs - max(1, 0.1 * theirs) <= ours <= 1.3 * theirs, (ours, theirs)


#
# Preconditioning and differentiation.
#


def test_jacobi_preconditioner_cuts_cg_iterations():
    n = 200
    rng = _rng(8)
    a = rng.normal(size=(n, n)) / np.sqrt(n)
    scale = np.logspace(0, 3, n)
    matrix = scale[:, None] * (a @ a.T + np.eye(n)) * scale[None, :]
    b = rng.normal(size=n)
    op = lx.MatrixLinearOperator(jnp.asarray(matrix), psd)
    jacobi = lx.DiagonalLinearOperator(jnp.asarray(1 / np.diag(matrix)))
    solver = lx.CG(1e-8, 0.0, max_steps=5000)
    plain = lx.linear_solve(op, jnp.asarray(b), solver, throw=False)
    pre = lx.linear_solve(
        op, jnp.asarray(b), solver, options={"preconditioner": jacobi}
    )
    assert pre.result == lx.RESULTS.successful
    assert 3 * int(pre.stats["num_steps"]) < int(plain.stats["num_steps"])
    np.testing.assert_allclose(pre.value, np.linalg.solve(matrix, b), rtol=1e-5)


def test_grad_through_preconditioned_gmres():
    n = 15
    matrix = _problems(n, seed=9)["nonsym"]
    b = _rng(10).normal(size=n)
    precond = lx.MatrixLinearOperator(
        jnp.asarray(np.linalg.inv(matrix) + 0.01 * np.eye(n))
    )
    solver = lx.GMRES(1e-12, 1e-12, restart=5)
    weights = jnp.asarray(_rng(11).normal(size=n))

    def loss(m, v):
        op = lx.MatrixLinearOperator(m)
        sol = lx.linear_solve(op, v, solver, options={"preconditioner": precond})
        return jnp.dot(weights, sol.value)

    def dense_loss(m, v):
        return jnp.dot(weights, jnp.linalg.solve(m, v))

    args = (jnp.asarray(matrix), jnp.asarray(b))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(*args)
    expected = jax.jit(jax.grad(dense_loss, argnums=(0, 1)))(*args)
    np.testing.assert_allclose(grads[0], expected[0], atol=1e-9)
    np.testing.assert_allclose(grads[1], expected[1], atol=1e-9)
    # Forward mode as well.
    tangents = (
        jnp.asarray(_rng(12).normal(size=(n, n))),
        jnp.asarray(_rng(13).normal(size=n)),
    )
    _, jvp = jax.jit(ft.partial(jax.jvp, loss))(args, tangents)
    _, expected_jvp = jax.jit(ft.partial(jax.jvp, dense_loss))(args, tangents)
    np.testing.assert_allclose(jvp, expected_jvp, rtol=1e-8)


@pytest.mark.parametrize(
    "make,tags",
    [
        (lambda: lx.CG(1e-12, 1e-12), psd),
        (lambda: lx.BiCGStab(1e-12, 1e-12), ()),
        (lambda: lx.MINRES(1e-12, 1e-12), lx.symmetric_tag),
    ],
    ids=["CG", "BiCGStab", "MINRES"],
)
def test_grad_with_preconditioner_and_y0(make, tags):
    n = 8
    matrix = _problems(n, seed=14)["spd"]
    op = lx.MatrixLinearOperator(jnp.asarray(matrix), tags)
    precond = lx.DiagonalLinearOperator(jnp.asarray(1 / np.diag(matrix)))
    b = jnp.asarray(_rng(15).normal(size=n))

    def loss(v, y0):
        options = {"preconditioner": precond, "y0": y0}
        return jnp.sum(lx.linear_solve(op, v, make(), options=options).value ** 2)

    grad_b, grad_y0 = jax.jit(jax.grad(loss, argnums=(0, 1)))(b, jnp.ones(n))
    x = np.linalg.solve(matrix, np.asarray(b))
    np.testing.assert_allclose(grad_b, np.linalg.solve(matrix.T, 2 * x), atol=1e-8)
    np.testing.assert_array_equal(grad_y0, np.zeros(n))


def test_lsmr_jvp_rank_deficient():
    rng = _rng(16)
    matrix = rng.normal(size=(12, 6))
    matrix[:, 5] = matrix[:, 4]
    b = rng.normal(size=12)
    tangent_m = rng.normal(size=(12, 6))
    tangent_b = rng.normal(size=12)

    def solve(m, v):
        return lx.linear_solve(
            lx.MatrixLinearOperator(m), v, lx.LSMR(1e-12, 1e-12)
        ).value

    def pinv_solve(m, v):
        return jnp.linalg.pinv(m) @ v

    args = (jnp.asarray(matrix), jnp.asarray(b))
    # Keep the tangent within rank-deficient matrices, where pinv is differentiable.
    tangent_m[:, 5] = tangent_m[:, 4]
    tangents = (jnp.asarray(tangent_m), jnp.asarray(tangent_b))
    _, ours = jax.jit(ft.partial(jax.jvp, solve))(args, tangents)
    _, expected = jax.jit(ft.partial(jax.jvp, pinv_solve))(args, tangents)
    np.testing.assert_allclose(ours, expected, atol=1e-6)


#
# Result codes, vmap, errors.
#


@pytest.mark.parametrize(
    "make,kind,tags",
    [
        (lambda: lx.CG(1e-12, 0.0, max_steps=3), "spd", psd),
        (lambda: lx.MINRES(1e-12, 0.0, max_steps=3), "sym", lx.symmetric_tag),
        (lambda: lx.GMRES(1e-12, 0.0, max_steps=3), "nonsym", ()),
        (lambda: lx.BiCGStab(1e-12, 0.0, max_steps=2), "nonsym", ()),
        (lambda: lx.LSMR(1e-12, 0.0, max_steps=3), "nonsym", ()),
    ],
    ids=["CG", "MINRES", "GMRES", "BiCGStab", "LSMR"],
)
def test_max_steps_reached(make, kind, tags):
    matrix = _problems(20, seed=17)[kind]
    op = lx.MatrixLinearOperator(jnp.asarray(matrix), tags)
    b = jnp.asarray(_rng(18).normal(size=20))
    sol = lx.linear_solve(op, b, make(), throw=False)
    assert sol.result == lx.RESULTS.max_steps_reached
    assert int(sol.stats["num_steps"]) == int(sol.stats["max_steps"])
    assert np.all(np.isfinite(sol.value))
    with pytest.raises(Exception, match="maximum number of solver steps"):
        jax.block_until_ready(lx.linear_solve(op, b, make()).value)


def test_vmap_mixed_convergence():
    n = 300
    # Element 0: five distinct eigenvalues, so CG converges in 5 steps. Element 1:
    # the 1-D Laplacian (condition number ~4e4), which needs hundreds of steps.
    easy = np.diag(np.repeat([1.0, 2.0, 3.0, 4.0, 5.0], n // 5))
    hard = 2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
    matrices = jnp.asarray(np.stack([easy, hard]))
    b = jnp.asarray(_rng(19).normal(size=(2, n)))
    solver = lx.CG(1e-9, 0.0)

    # (Compiled once, not op by op; under `vmap` the library traces the same path.)
    @jax.jit
    @jax.vmap
    def solve(m, v):
        sol = lx.linear_solve(lx.MatrixLinearOperator(m, psd), v, solver, throw=False)
        return sol.value, sol.result == lx.RESULTS.successful, sol.stats["num_steps"]

    values, ok, steps = solve(matrices, b)
    assert bool(ok.all())
    assert int(steps[0]) <= 6 and int(steps[1]) >= 150
    for i, m in enumerate((easy, hard)):
        np.testing.assert_allclose(
            values[i], np.linalg.solve(m, b[i]), rtol=1e-6, atol=1e-8
        )

    # The same for GMRES, with its restarts (on a better conditioned hard system:
    # restarted GMRES barely progresses on the 1-D Laplacian).
    hard = 2.01 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
    matrices = jnp.asarray(np.stack([easy, hard]))
    gmres = lx.GMRES(1e-9, 0.0)

    @jax.jit
    @jax.vmap
    def solve_gmres(m, v):
        sol = lx.linear_solve(lx.MatrixLinearOperator(m), v, gmres, throw=False)
        return sol.value, sol.result == lx.RESULTS.successful, sol.stats["num_steps"]

    values, ok, steps = solve_gmres(matrices, b)
    assert bool(ok.all())
    assert int(steps[0]) <= 6 and int(steps[1]) >= 150
    for i, m in enumerate((easy, hard)):
        np.testing.assert_allclose(
            values[i], np.linalg.solve(m, b[i]), rtol=1e-6, atol=1e-7
        )


def test_singular_never_successful():
    matrix = _problems(10, seed=20)["sym"]
    matrix[0, :] = 0
    matrix[:, 0] = 0
    spd = _problems(10, seed=20)["spd"]
    spd[0, :] = 0
    spd[:, 0] = 0
    b = jnp.asarray(_rng(21).normal(size=10))
    for solver, m, tags in (
        (lx.CG(1e-10, 0.0), spd, psd),
        (lx.MINRES(1e-10, 0.0), matrix, lx.symmetric_tag),
        (lx.GMRES(1e-10, 0.0), matrix, ()),
        (lx.BiCGStab(1e-10, 0.0), matrix, ()),
    ):
        op = lx.MatrixLinearOperator(jnp.asarray(m), tags)
        sol = lx.linear_solve(op, b, solver, throw=False)
        assert sol.result != lx.RESULTS.successful, type(solver).__name__


def test_zero_rhs_and_exact_y0():
    matrix = _problems(6)["nonsym"]
    op = lx.MatrixLinearOperator(jnp.asarray(matrix))
    for solver in (lx.BiCGStab(1e-8, 0.0), lx.LSMR(1e-8, 0.0)):
        sol = lx.linear_solve(op, jnp.zeros(6), solver)
        np.testing.assert_array_equal(sol.value, np.zeros(6))
        assert int(sol.stats["num_steps"]) == 0
    x = jnp.arange(6.0)
    sol = lx.linear_solve(op, op.mv(x), lx.GMRES(1e-8, 1e-12), options={"y0": x})
    assert int(sol.stats["num_steps"]) == 0


def test_normal_cg_is_a_deprecated_alias():
    # lineax 0.1.1 warns when `NormalCG` is constructed; so does this one.
    with pytest.warns(DeprecationWarning, match="lx.Normal\\(lx.CG"):
        solver = lx.NormalCG(1e-6, 1e-6, stabilise_every=5)
    assert solver == lx.Normal(lx.CG(1e-6, 1e-6, stabilise_every=5))


def test_mixed_dtype_pytree_operator_is_a_clear_error():
    # A PyTree operator whose leaves mix float32 and float64 failed inside the
    # Krylov loops with "while_loop body function carry input and carry output
    # must have equal types" (GMRES: "dynamic_update_slice requires arguments to
    # have the same dtypes").
    a32 = jnp.asarray(np.diag([2.0, 3.0]), jnp.float32)
    a64 = jnp.asarray(np.diag([4.0, 5.0, 6.0]), jnp.float64)
    blocks = (
        (a32, jnp.zeros((2, 3), jnp.float32)),
        (jnp.zeros((3, 2), jnp.float64), a64),
    )
    structure = (
        jax.ShapeDtypeStruct((2,), jnp.float32),
        jax.ShapeDtypeStruct((3,), jnp.float64),
    )
    operator = lx.PyTreeLinearOperator(blocks, structure, lx.positive_semidefinite_tag)
    b = (jnp.ones(2, jnp.float32), jnp.ones(3, jnp.float64))
    for solver in (lx.CG(1e-6, 1e-6), lx.GMRES(1e-6, 1e-6), lx.LSMR(1e-6, 1e-6)):
        # (Either message: mixed dtypes, or input and output structures differing.)
        with pytest.raises(ValueError, match="float32, float64|structures"):
            lx.linear_solve(operator, b, solver)
    # A direct solver takes it.
    x = lx.linear_solve(operator, b, lx.LU()).value
    np.testing.assert_allclose(x[1], 1 / np.array([4.0, 5.0, 6.0]))


def test_errors():
    with pytest.raises(ValueError, match="rtol"):
        lx.CG(-1.0, 0.0)
    with pytest.raises(ValueError, match="atol"):
        lx.GMRES(0.0, -1e-3)
    with pytest.raises(ValueError, match="max_steps"):
        lx.BiCGStab(0.0, 0.0)
    lx.BiCGStab(0.0, 0.0, max_steps=10)
    with pytest.raises(ValueError, match="restart"):
        lx.GMRES(1e-5, 1e-5, restart=0)
    matrix = jnp.asarray(_problems(4)["spd"])
    untagged = lx.MatrixLinearOperator(matrix)
    b = jnp.ones(4)
    with pytest.raises(ValueError, match="positive_semidefinite_tag"):
        lx.linear_solve(untagged, b, lx.CG(1e-5, 1e-5))
    with pytest.raises(ValueError, match="symmetric_tag"):
        lx.linear_solve(untagged, b, lx.MINRES(1e-5, 1e-5))
    with pytest.raises(ValueError, match="square"):
        lx.linear_solve(
            lx.MatrixLinearOperator(jnp.ones((3, 4))), jnp.ones(3), lx.GMRES(1e-5, 1e-5)
        )
    with pytest.raises(ValueError, match="preconditioner"):
        lx.linear_solve(
            untagged, b, lx.GMRES(1e-5, 1e-5), options={"preconditioner": matrix}
        )
    bad = lx.MatrixLinearOperator(jnp.eye(3))
    with pytest.raises(ValueError, match="preconditioner"):
        lx.linear_solve(
            untagged, b, lx.GMRES(1e-5, 1e-5), options={"preconditioner": bad}
        )
    with pytest.raises(ValueError, match="y0"):
        lx.linear_solve(untagged, b, lx.GMRES(1e-5, 1e-5), options={"y0": jnp.ones(3)})


def test_minres_loose_tolerance_on_nonsingular_system_is_not_singular():
    # MINRES also stops when its estimate of ||A r|| / (||A|| ||r||) falls below a
    # threshold (Paige and Saunders' least-squares test, for singular inconsistent
    # systems; SciPy's too), then reports `singular` unless the true residual
    # passes. With that threshold at `rtol`, a loose tolerance stopped on
    # nonsingular systems, where ||A r|| / (||A|| ||r||) >= 1 / cond(A) is no
    # sign of inconsistency: SPD of cond 1e2 at rtol 1e-1 after 9 steps (true
    # residual 0.15), cond 1e5 at rtol 1e-3 after 28 steps (0.47), both
    # `singular` (SciPy: 0.68 and 0.76, reported converged). The threshold is now
    # at most sqrt(eps): 11 and 152 steps, `successful`, as CG (12 and 174).
    rng = np.random.default_rng(0)
    n = 50
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    b = jnp.asarray(rng.standard_normal(n))
    solve = jax.jit(
        lambda a, solver: lx.linear_solve(
            lx.MatrixLinearOperator(a, lx.symmetric_tag), b, solver, throw=False
        ),
        static_argnums=1,
    )
    for cond, rtol in ((1e2, 1e-1), (1e5, 1e-3)):
        a = (q * np.logspace(0, -np.log10(cond), n)) @ q.T
        a = jnp.asarray((a + a.T) / 2)
        sol = solve(a, lx.MINRES(rtol, 0.0, norm=lx.internal.two_norm))
        assert sol.result == lx.RESULTS.successful, (cond, rtol)
        residual = np.linalg.norm(b - a @ sol.value)
        assert residual <= rtol * np.linalg.norm(b), (cond, rtol)


def test_solvers_are_static():
    solver = lx.GMRES(1e-5, 1e-6, restart=7)
    assert hash(solver) == hash(lx.GMRES(1e-5, 1e-6, restart=7))
    assert jax.tree_util.tree_leaves(solver) == []
    for cls in (lx.CG, lx.MINRES, lx.BiCGStab, lx.LSMR):
        assert jax.tree_util.tree_leaves(cls(1e-5, 1e-6)) == []


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.complex128])
def test_lsmr_preconditioner_that_is_not_hermitian(dtype):
    # LSMR applied `N` where `(A N)^H = N^H A^H` needs `N^H`: with SSOR of a
    # nonsymmetric matrix (or any non-Hermitian `N`) it made no progress at all
    # (100 steps, `max_steps_reached`, relative error 1.0; the gradient raised).
    rng = _rng(3)
    n = 10
    matrix = rng.normal(size=(n, n)) + 4 * np.sqrt(n) * np.eye(n)
    if dtype == jnp.complex128:
        matrix = matrix + 1j * rng.normal(size=(n, n))
    matrix = matrix * np.logspace(0, 3, n)[:, None]
    b = rng.normal(size=n).astype(dtype)
    op = lx.MatrixLinearOperator(jnp.asarray(matrix, dtype))
    if dtype == jnp.float64:
        precond = lx.SSORPreconditioner(op)
    else:
        # A rough inverse that is not Hermitian.
        rough = np.linalg.inv(matrix) * (1 + 0.1 * rng.normal(size=(n, n)))
        precond = lx.MatrixLinearOperator(jnp.asarray(rough, dtype))
    solver = lx.LSMR(1e-10, 0.0)
    options = {"preconditioner": precond}
    sol = lx.linear_solve(op, jnp.asarray(b), solver, options=options, throw=False)
    expected = np.linalg.solve(matrix, b)
    assert sol.result == lx.RESULTS.successful
    assert int(sol.stats["num_steps"]) < 40
    np.testing.assert_allclose(np.asarray(sol.value), expected, rtol=1e-8)

    def loss(v):
        x = lx.linear_solve(op, v, solver, options=options).value
        return jnp.sum(jnp.abs(x) ** 2)

    # (Compiled once, not op by op: the same traced path.)
    grad = jax.jit(jax.grad(loss))(jnp.asarray(np.real(b), jnp.float64).astype(dtype))
    x = np.linalg.solve(matrix, np.real(b))
    expected_grad = 2 * np.linalg.solve(matrix.conj().T, x)
    np.testing.assert_allclose(np.asarray(grad), np.conj(expected_grad), rtol=1e-7)


def test_y0_of_a_narrower_dtype_is_cast():
    # A float32 initial guess (from a cheaper float32 solve, say) for a float64
    # operator was a ValueError, while a float32 right-hand side is promoted.
    matrix = _problems(6)["spd"]
    b = _rng(6).normal(size=6)
    op = lx.MatrixLinearOperator(jnp.asarray(matrix), psd)
    guess = jnp.asarray(np.linalg.solve(matrix, b), jnp.float32)
    for solver in (lx.CG(1e-10, 0.0), lx.GMRES(1e-10, 0.0)):
        sol = lx.linear_solve(op, jnp.asarray(b), solver, options={"y0": guess})
        assert sol.value.dtype == jnp.float64
        np.testing.assert_allclose(sol.value, np.linalg.solve(matrix, b), rtol=1e-8)
    with pytest.raises(ValueError, match="y0"):
        lx.linear_solve(
            op,
            jnp.asarray(b),
            lx.CG(1e-10, 0.0),
            options={"y0": guess.astype(jnp.complex64)},
        )


def test_y0_of_integers_or_python_numbers_is_cast_for_a_float32_operator():
    # An integer guess was cast only where NumPy casts it safely (int64 to
    # float64), as the right-hand side is always: for a float32 operator it was
    # refused as "expected float32[3], got float64[3]" (the dtype it would be
    # converted to, not the one passed); so was a Python number for a scalar one.
    matrix = np.asarray([[4.0, 1, 0], [1, 3, 1], [0, 1, 2]])
    op = lx.MatrixLinearOperator(jnp.asarray(matrix, jnp.float32), psd)
    b = jnp.ones(3, jnp.float32)
    want = np.linalg.solve(matrix, np.ones(3))
    solvers = (
        lx.CG(rtol=1e-6, atol=1e-6, max_steps=20),
        lx.GMRES(rtol=1e-6, atol=1e-6, max_steps=20),
        lx.LSMR(rtol=1e-6, atol=1e-6, max_steps=20),
    )
    for solver in solvers:
        for guess in (
            jnp.zeros(3, jnp.int64),
            jnp.zeros(3, jnp.int32),
            np.ones(3, int),
        ):
            solution = lx.linear_solve(op, b, solver, options={"y0": guess})
            assert solution.value.dtype == jnp.float32
            np.testing.assert_allclose(solution.value, want, rtol=1e-5)
        with pytest.raises(ValueError, match=r"`y0`.*got float64\[3\]"):
            lx.linear_solve(op, b, solver, options={"y0": jnp.zeros(3)})
    scalar = lx.TaggedLinearOperator(
        lx.DiagonalLinearOperator(jnp.float32(2.0)), lx.positive_semidefinite_tag
    )
    solver = lx.CG(rtol=1e-6, atol=1e-6, max_steps=5)
    value = lx.linear_solve(scalar, 1.0, solver, options={"y0": 1.0}).value
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(value, 0.5)


@pytest.mark.parametrize(
    "solver",
    [
        lx.BiCGStab(rtol=1e-5, atol=1e-6),
        lx.GMRES(rtol=1e-5, atol=1e-6),
        lx.CG(rtol=1e-5, atol=1e-6),
    ],
    ids=lambda s: type(s).__name__,
)
def test_right_hand_side_below_atol_gets_the_relative_target(solver):
    # Newton near its root: the right-hand side (the nonlinear residual) is below
    # the Krylov solver's `atol`. One step from it is not a solve (Newton then
    # stalls; Diffrax's ImplicitEuler + Newton(BiCGStab) on Robertson failed at
    # t = 82 where lineax 0.1.1 finishes): the first pass aims at `rtol` instead.
    # BiCGStab's half-step test compared with `tol` and ended after one step,
    # relative residual 0.67. (Bounded: n = 30, the default max_steps.)
    rng = _rng(7)
    n = 30
    m = rng.normal(size=(n, n))
    matrix = m @ m.T + n * np.eye(n)
    if not isinstance(solver, lx.CG):
        matrix = matrix + 3 * rng.normal(size=(n, n))
    tags = (lx.positive_semidefinite_tag,) if isinstance(solver, lx.CG) else ()
    operator = lx.MatrixLinearOperator(jnp.asarray(matrix), tags)
    b = rng.normal(size=n)
    solve = jax.jit(lambda v: lx.linear_solve(operator, v, solver, throw=False))
    for scale in (1.0, 1e-9):
        sol = solve(jnp.asarray(scale * b))
        assert sol.result == lx.RESULTS.successful
        x = np.asarray(sol.value)
        relative = np.linalg.norm(matrix @ x - scale * b) / np.linalg.norm(scale * b)
        assert relative <= 1e-3, (scale, relative, int(sol.stats["num_steps"]))
