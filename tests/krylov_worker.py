"""Runs Krylov solves that must terminate, in a subprocess of
`test_krylov_termination.py` (a hang under `jit` cannot be interrupted), and prints
one JSON line per case: the result, steps, operator products and the true
residual recomputed in float64 with NumPy.

Usage: `python tests/krylov_worker.py GROUP...` with each GROUP one of `edge`,
`table`, `stagnation`, `scaled`, `breakdown`.
"""

import json
import sys

import jax


jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lineax as lx  # noqa: E402


psd = lx.positive_semidefinite_tag
two_norm = lx.internal.two_norm


@eqx.filter_jit
def _jit_solve(op, v, solver):
    sol = lx.linear_solve(op, v, solver, throw=False)
    return lx.Solution(sol.value, sol.result, sol.stats, None)


def _report(name, sol, matrix, b, extra=None):
    x = np.asarray(sol.value, np.complex128).ravel()
    b64 = np.asarray(b, np.complex128).ravel()
    with np.errstate(all="ignore"):
        r = np.linalg.norm(b64 - matrix @ x) if np.all(np.isfinite(x)) else np.inf
        out = {
            "name": name,
            "code": int(sol.result._value),
            "steps": int(sol.stats["num_steps"]),
            "max_steps": int(sol.stats["max_steps"]),
            "num_mv": int(sol.stats["num_mv"]),
            "rnorm": float(r),
            "bnorm": float(np.linalg.norm(b64)),
            "rmax": float(np.max(np.abs(b64 - matrix @ x)))
            if np.all(np.isfinite(x))
            else None,
            "bmax": float(np.max(np.abs(b64))),
            "history_recorded": int(np.sum(sol.stats["residual_history"] != 0)),
            "xnorm": float(np.linalg.norm(x)) if np.all(np.isfinite(x)) else None,
            "finite": bool(np.all(np.isfinite(x))),
            "reported": float(sol.stats["residual_norm"]),
        }
    if extra:
        out.update(extra)
    print(json.dumps(out), flush=True)


def _matrices(n=12):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n, n))
    return {
        "CG": (a @ a.T + n * np.eye(n), psd),
        "MINRES": (a + a.T, lx.symmetric_tag),
        "GMRES": (a + 2 * np.sqrt(n) * np.eye(n), ()),
        "BiCGStab": (a + 2 * np.sqrt(n) * np.eye(n), ()),
        "LSMR": (a + 2 * np.sqrt(n) * np.eye(n), ()),
    }


_SOLVERS = {
    "CG": lx.CG,
    "MINRES": lx.MINRES,
    "GMRES": lx.GMRES,
    "BiCGStab": lx.BiCGStab,
    "LSMR": lx.LSMR,
}


def edge():
    """Each solver, float32/float64, on zero, tiny, huge, NaN and inf right-hand sides,
    an unreachable tolerance, and singular consistent and inconsistent systems."""
    n = 12
    rng = np.random.default_rng(1)
    b = rng.normal(size=n)
    for name, (matrix, tags) in _matrices(n).items():
        # A singular operator of the same class: one eigen/singular value zeroed.
        u, s, vt = np.linalg.svd(matrix)
        if name in ("CG", "MINRES"):
            w, q = np.linalg.eigh(matrix)
            w[0] = 0.0
            singular = (q * w) @ q.T
            null = q[:, 0]
        else:
            s[-1] = 0.0
            singular = (u * s) @ vt
            null = u[:, -1]
        consistent = singular @ rng.normal(size=n)
        inconsistent = consistent + null
        for dtype in (jnp.float32, jnp.float64):
            tol = 1e-5 if dtype == jnp.float32 else 1e-10
            cases = [
                ("plain", matrix, b, tol),
                ("pow2", matrix, 2.0**-60 * b, tol),
                ("zero", matrix, 0 * b, tol),
                ("tiny", matrix, 1e-30 * b, tol),
                ("huge", matrix, 1e30 * b, tol),
                ("nan", matrix, np.where(np.arange(n) == 3, np.nan, b), tol),
                ("inf", matrix, np.where(np.arange(n) == 3, np.inf, b), tol),
                ("unreachable", matrix, b, 1e-30),
                ("singular_consistent", singular, consistent, tol),
                ("singular_inconsistent", singular, inconsistent, tol),
            ]
            for case, mat, rhs, rtol in cases:
                op = lx.MatrixLinearOperator(jnp.asarray(mat, dtype), tags)
                solver = _SOLVERS[name](rtol, 0.0)
                vec = jnp.asarray(rhs, dtype)
                sol = _jit_solve(op, vec, solver)
                _report(
                    f"{name}-{jnp.dtype(dtype).name}-{case}",
                    sol,
                    mat,
                    np.asarray(vec, np.float64),
                    {"rtol": rtol},
                )


def _laplacian_2d(k, shift, neumann=False):
    import scipy.sparse as sp

    # SciPy leaves `offsets` unannotated: pyright types it by its default `0`.
    lap = sp.diags([-1, 2, -1], [-1, 0, 1], shape=(k, k), dtype=float).tolil()  # pyright: ignore[reportArgumentType]
    if neumann:
        lap[0, 0] = 1
        lap[k - 1, k - 1] = 1
    lap = lap.tocsr()
    eye = sp.identity(k)
    return (sp.kron(lap, eye) + sp.kron(eye, lap) + shift * sp.identity(k * k)).tocsr()


def _stencil_op(matrix, k, dtype, tags):
    # The sparse matrix applied as a dense-free JAX function (BCOO).
    from jax.experimental import sparse as jsparse

    m = jsparse.BCOO.from_scipy_sparse(matrix.astype(np.dtype(dtype)))
    return lx.FunctionLinearOperator(
        lambda u: (m @ u.ravel()).reshape(k, k),
        jax.ShapeDtypeStruct((k, k), dtype),
        tags,
    )


def table():
    """The rows of the table of failures (smaller sizes, same behaviour)."""
    rng = np.random.default_rng(2)
    f32 = jnp.float32

    # CG, 2-D Poisson with a small shift, float32, rtol below the float32 floor.
    k = 96
    mat = _laplacian_2d(k, 1e-4)
    b = rng.normal(size=(k, k))
    op = _stencil_op(mat, k, f32, psd)
    sol = _jit_solve(op, jnp.asarray(b, f32), lx.CG(1e-7, 0.0, two_norm))
    _report("cg_poisson_f32", sol, mat, np.asarray(jnp.asarray(b, f32), np.float64))

    # CG, 1-D Laplacian n = 200, float32, rtol = atol = 1e-4.
    n = 200
    lap = 2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
    b = rng.normal(size=n)
    op = lx.MatrixLinearOperator(jnp.asarray(lap, f32), psd)
    sol = lx.linear_solve(op, jnp.asarray(b, f32), lx.CG(1e-4, 1e-4), throw=False)
    _report("cg_laplace1d_f32", sol, lap, np.asarray(jnp.asarray(b, f32), np.float64))

    # CG, 30x30 SPD, rtol = atol = 0, max_steps = 100: exactly 100 steps.
    a = rng.normal(size=(30, 30))
    spd = a @ a.T + np.eye(30)
    b = rng.normal(size=30)
    for dtype in (jnp.float32, jnp.float64):
        op = lx.MatrixLinearOperator(jnp.asarray(spd, dtype), psd)
        vec = jnp.asarray(b, dtype)
        sol = lx.linear_solve(op, vec, lx.CG(0.0, 0.0, max_steps=100), throw=False)
        _report(
            f"cg_fixed_{jnp.dtype(dtype).name}", sol, spd, np.asarray(vec, np.float64)
        )

    # LSMR, column-scaled least squares with a diagonal preconditioner: the
    # gradient's transposed solve keeps the preconditioner.
    m, n = 60, 20
    base = rng.normal(size=(m, n))
    scales = np.logspace(0, 4, n)
    cols = base * scales
    b = rng.normal(size=m)
    precond = lx.DiagonalLinearOperator(jnp.asarray(1 / scales))
    solver = lx.LSMR(1e-10, 0.0)

    def loss(v):
        sol = lx.linear_solve(
            lx.MatrixLinearOperator(jnp.asarray(cols)),
            v,
            solver,
            options={"preconditioner": precond},
        )
        return jnp.sum(sol.value**2), sol.stats["num_steps"]

    (_, steps), grad = eqx.filter_jit(jax.value_and_grad(loss, has_aux=True))(
        jnp.asarray(b)
    )
    pinv = np.linalg.pinv(cols)
    expected = 2 * pinv.T @ (pinv @ b)
    print(
        json.dumps(
            {
                "name": "lsmr_precond_grad",
                "steps": int(steps),
                "grad_error": float(
                    np.linalg.norm(np.asarray(grad) - expected)
                    / np.linalg.norm(expected)
                ),
            }
        ),
        flush=True,
    )

    # MINRES, indefinite Laplacian - 0.05 I, float32, rtol 1e-4.
    k = 64
    mat = _laplacian_2d(k, -0.05)
    b = rng.normal(size=(k, k))
    op = _stencil_op(mat, k, f32, lx.symmetric_tag)
    sol = _jit_solve(op, jnp.asarray(b, f32), lx.MINRES(1e-4, 0.0, two_norm))
    _report(
        "minres_indefinite_f32", sol, mat, np.asarray(jnp.asarray(b, f32), np.float64)
    )

    # LSMR, tall, cond 1e3, float32, rtol 1e-7.
    m, n = 500, 100
    q1, _ = np.linalg.qr(rng.normal(size=(m, n)))
    q2, _ = np.linalg.qr(rng.normal(size=(n, n)))
    tall = (q1 * np.logspace(0, -3, n)) @ q2.T
    b = rng.normal(size=m)
    op = lx.MatrixLinearOperator(jnp.asarray(tall, f32))
    sol = lx.linear_solve(op, jnp.asarray(b, f32), lx.LSMR(1e-7, 0.0), throw=False)
    x = np.asarray(sol.value, np.float64)
    r = np.asarray(jnp.asarray(b, f32), np.float64) - tall @ x
    lsq = np.linalg.lstsq(tall, np.asarray(jnp.asarray(b, f32), np.float64))[0]
    _report(
        "lsmr_tall_f32",
        sol,
        tall,
        np.asarray(jnp.asarray(b, f32), np.float64),
        {
            "normal": float(np.linalg.norm(tall.T @ r) / np.linalg.norm(r)),
            "rnorm_lsq": float(np.linalg.norm(b - tall @ lsq)),
        },
    )

    # MINRES, Neumann Laplacian (singular, inconsistent), float64.
    k = 16
    mat = _laplacian_2d(k, 0.0, neumann=True)
    b = rng.normal(size=(k, k))
    op = _stencil_op(mat, k, jnp.float64, lx.symmetric_tag)
    sol = _jit_solve(op, jnp.asarray(b), lx.MINRES(1e-8, 0.0, two_norm))
    dense = mat.toarray()
    lsq = np.linalg.lstsq(dense, b.ravel(), rcond=None)[0]
    _report(
        "minres_neumann_f64",
        sol,
        dense,
        b.ravel(),
        {
            "rnorm_lsq": float(np.linalg.norm(b.ravel() - dense @ lsq)),
            "xnorm_lsq": float(np.linalg.norm(lsq)),
        },
    )

    # BiCGStab, convection-diffusion, float32, rtol 1e-8 (unreachable).
    import scipy.sparse as sp

    k = 32
    eye = sp.identity(k)
    # SciPy leaves `offsets` unannotated: pyright types it by its default `0`.
    conv = sp.kron(sp.diags([-1, 1], [-1, 0], shape=(k, k), dtype=float), eye)  # pyright: ignore[reportArgumentType]
    mat = (_laplacian_2d(k, 0.05) + conv).tocsr()
    b = rng.normal(size=(k, k))
    op = _stencil_op(mat, k, f32, ())
    for name, solver in (
        ("bicgstab", lx.BiCGStab(1e-8, 0.0, two_norm)),
        ("gmres", lx.GMRES(1e-8, 0.0, two_norm)),
    ):
        sol = _jit_solve(op, jnp.asarray(b, f32), solver)
        _report(
            f"{name}_convdiff_f32",
            sol,
            mat,
            np.asarray(jnp.asarray(b, f32), np.float64),
        )


def stagnation():
    """Problems whose tolerance is below the float32 floor: a prompt, honest stop."""
    rng = np.random.default_rng(3)
    f32 = jnp.float32

    # CG, 2-D Poisson 40x40 (n = 1600) as a dense PSD matrix, float32,
    # rtol = atol = 1e-6: once reported `breakdown` with a diverged iterate.
    k = 40
    mat = _laplacian_2d(k, 0.0).toarray()
    grid = np.linspace(1, k, k) / (k + 1)
    rhs = {
        "ones": np.ones(k * k),
        "sin": np.outer(np.sin(np.pi * grid), np.sin(np.pi * grid)).ravel(),
        "randn": rng.normal(size=k * k),
    }
    op = lx.MatrixLinearOperator(jnp.asarray(mat, f32), psd)
    for name, b in rhs.items():
        vec = jnp.asarray(b, f32)
        sol = _jit_solve(op, vec, lx.CG(1e-6, 1e-6))
        _report(f"cg_poisson40_f32_{name}", sol, mat, np.asarray(vec, np.float64))

    # MINRES, indefinite Laplacian - 0.05 I, 64x64, float32, rtol 1e-4 in the
    # max norm (below the floor): once 2200 steps before `stagnation`.
    k = 64
    mat = _laplacian_2d(k, -0.05)
    b = rng.normal(size=(k, k))
    op = _stencil_op(mat, k, f32, lx.symmetric_tag)
    vec = jnp.asarray(b, f32)
    sol = _jit_solve(op, vec, lx.MINRES(1e-4, 0.0))
    _report("minres_indefinite_maxnorm_f32", sol, mat, np.asarray(vec, np.float64))

    # LSMR, 1000x200, cond 1e3, float32, rtol 1e-7 (normal equations below the
    # floor): once thousands of steps before `stagnation`.
    m, n = 1000, 200
    q1, _ = np.linalg.qr(rng.normal(size=(m, n)))
    q2, _ = np.linalg.qr(rng.normal(size=(n, n)))
    tall = (q1 * np.logspace(0, -3, n)) @ q2.T
    vec = jnp.asarray(rng.normal(size=m), f32)
    b64 = np.asarray(vec, np.float64)
    sol = _jit_solve(lx.MatrixLinearOperator(jnp.asarray(tall, f32)), vec,
                     lx.LSMR(1e-7, 0.0))  # fmt: skip
    lsq = np.linalg.lstsq(tall, b64, rcond=None)[0]
    _report(
        "lsmr_tall_f32_1000x200",
        sol,
        tall,
        b64,
        {"rnorm_lsq": float(np.linalg.norm(b64 - tall @ lsq))},
    )


def scaled():
    """Each solver, float32/float64, on the edge group's operators multiplied by
    large and small factors (powers of two and not): the solution scales inversely,
    the steps stay the same."""
    n = 12
    b = np.random.default_rng(1).normal(size=n)
    solvers = dict(_SOLVERS, FGMRES=lx.FGMRES, FlexibleCG=lx.FlexibleCG,
                   PipelinedCG=lx.PipelinedCG)  # fmt: skip
    matrices = _matrices(n)
    factors = {
        "float32": {"one": 1.0, "pow2": 2.0**60, "big": 1e20, "small": 1e-20},
        "float64": {"one": 1.0, "pow2": 2.0**-600, "big": 1e200, "small": 1e-200},
    }
    # Near the smallest normal floats, with a solution near the largest: the
    # scaled-up operator's iterate overflowed on the way back to the user's units
    # (inf, "singular") where the solution itself is a float.
    factors["float32"]["tiny"] = 2.0**-118
    factors["float64"]["tiny"] = 1e-300
    for name, solver_class in solvers.items():
        matrix, tags = matrices.get(name, matrices["CG"])
        for dtype in (jnp.float32, jnp.float64):
            dname = jnp.dtype(dtype).name
            tol = 1e-5 if dtype == jnp.float32 else 1e-10
            vec = jnp.asarray(b, dtype)
            exact = np.linalg.solve(matrix, np.asarray(vec, np.float64))
            for case, factor in factors[dname].items():
                op = lx.MatrixLinearOperator(jnp.asarray(matrix * factor, dtype), tags)
                sol = _jit_solve(op, vec, solver_class(tol, 0.0))
                # The solution of the unscaled system (exact for a power of two).
                x = np.asarray(sol.value, np.float64) * factor
                record = {
                    "name": f"{name}-{dname}-{case}",
                    "code": int(sol.result._value),
                    "steps": int(sol.stats["num_steps"]),
                    "error": float(np.linalg.norm(x - exact) / np.linalg.norm(exact)),
                    "x": [float(xi) for xi in x],
                }
                print(json.dumps(record), flush=True)


def breakdown():
    """BiCGStab on a skew-symmetric operator, whose `<r, A r>` vanishes right
    after every (re)start: exactly (an integer operator and right-hand side, in
    any precision), or far below `eps |b| |A b|` (shifted by 1e-20 I, float64)."""
    n = 6
    upper = np.triu(np.arange(1.0, n * n + 1).reshape(n, n) % 7 - 3, 1)
    skew = upper - upper.T
    b = np.arange(1.0, n + 1)
    for dtype, shift in ((jnp.float32, 0.0), (jnp.float64, 0.0), (jnp.float64, 1e-20)):
        matrix = skew + shift * np.eye(n)
        for norm in (lx.internal.max_norm, two_norm):
            op = lx.MatrixLinearOperator(jnp.asarray(matrix, dtype))
            solver = lx.BiCGStab(1e-5, 1e-5, norm=norm)
            sol = _jit_solve(op, jnp.asarray(b, dtype), solver)
            x = np.asarray(sol.value, np.float64)
            name = f"{jnp.dtype(dtype).name}-shift={shift}-{norm.__name__}"
            record = {
                "name": name,
                "breakdown": bool(sol.result == lx.RESULTS.breakdown),
                "steps": int(sol.stats["num_steps"]),
                "finite": bool(np.all(np.isfinite(x))),
                "rnorm": float(np.linalg.norm(b - matrix @ x)),
                "bnorm": float(np.linalg.norm(b)),
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    # Several groups share one process (and its JAX import and compiled solves); a
    # line naming each group comes before its cases.
    for group in sys.argv[1:]:
        print(json.dumps({"group": group}), flush=True)
        groups = {
            "edge": edge,
            "table": table,
            "stagnation": stagnation,
            "scaled": scaled,
            "breakdown": breakdown,
        }
        groups[group]()
