"""An adversarial review of `linear_solve` under JAX's configuration flags and
debugging modes, as research users and client libraries turn them on:
`jax_debug_nans`, `jax_debug_infs`, `jax.disable_jit()`, `jax.transfer_guard`,
`jax_numpy_rank_promotion="raise"`, `jax_numpy_dtype_promotion="strict"`,
`jax_enable_checks`, `jax_check_tracer_leaks`, `jax_default_matmul_precision`,
x64 off, and Equinox's `EQX_ON_ERROR=nan` / `breakpoint`.

Reviewed, and found to agree with NumPy (every exported solver and the main
operators, primal, `jax.grad`, `jax.jvp`, `jax.vmap` and `jax.jit`): each flag on
its own with x64 on, the four checking flags together with x64 off, and
`jax.disable_jit()` with and without `jax_debug_nans`/`jax_debug_infs`. What
broke is tested here; each test failed before the fix it protects.

Config flags are process-global: the checks run in one subprocess (one script,
its lines read by the tests). Every expected value comes from NumPy in float64.
"""

import functools

import numpy as np
import pytest
from helpers import run_python
from jaxtyping import Float


_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np, equinox as eqx
jax.config.update("jax_enable_x64", True)
import lineax as lx

rng = np.random.default_rng(0)
n = 4
a = rng.normal(size=(n, n)) + n * np.eye(n)
sym = a + a.T  # symmetric indefinite
spd = a @ a.T + np.eye(n)
b = rng.normal(size=n)
vec = jnp.asarray(b)
kw = dict(rtol=1e-10, atol=1e-10, max_steps=60)


def matrix(m, *tags):
    return lx.MatrixLinearOperator(jnp.asarray(m), tags)


def report(name, fn):
    try:
        got, want = fn()
        err = float(np.max(np.abs(np.asarray(got) - want)))
        print(f"{name}: OK {err!r}" if err < 1e-8 else f"{name}: WRONG {err!r}")
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        print(f"{name}: EXC {type(e).__name__}: {msg}")


def message(fn):
    try:
        fn()
    except Exception as e:
        return type(e).__name__ + ": " + " ".join(str(e).split())[:200]
    return "no error"


# Successful solves under `disable_jit` with NaN and infinity checks on.
with jax.debug_nans(True), jax.debug_infs(True), jax.disable_jit():
    for name, op, solver, m in [
        ("MINRES", matrix(sym, lx.symmetric_tag), lx.MINRES(**kw), sym),
        ("LU", matrix(a), lx.LU(), a),
        ("Cholesky", matrix(spd, lx.positive_semidefinite_tag), lx.Cholesky(), spd),
        ("CG", matrix(spd, lx.positive_semidefinite_tag), lx.CG(**kw), spd),
        ("GMRES", matrix(a), lx.GMRES(**kw), a),
        ("LSMR", matrix(a), lx.LSMR(**kw), a),
        ("SVD-pinv", matrix(np.diag([2.0, 0, 1, 3])), lx.SVD(),
         np.diag([2.0, 0, 1, 3])),
    ]:
        report(
            f"nojit-debug {name}",
            lambda: (lx.linear_solve(op, vec, solver).value, np.linalg.pinv(m) @ b),
        )

# A failed un-jitted solve with NaN checks on: lineax's message, not JAX's.
singular = np.array([[1.0, 2, 3], [2, 4, 6], [1, 0, 1]])
rhs = jnp.asarray([1.0, 2.0, 3.0])
tri = lx.TridiagonalLinearOperator(jnp.zeros(3), jnp.zeros(2), jnp.zeros(2))
with jax.debug_nans(True):
    for name, fn in [
        ("LU", lambda: lx.linear_solve(matrix(singular), rhs, lx.LU())),
        ("invert", lambda: lx.invert(matrix(singular), lx.LU()).mv(rhs)),
        ("Cholesky", lambda: lx.linear_solve(
            matrix(np.diag([1.0, 1, 0]), lx.positive_semidefinite_tag), rhs,
            lx.Cholesky())),
        ("Tridiagonal", lambda: lx.linear_solve(tri, rhs, lx.Tridiagonal())),
    ]:
        print(f"nans-singular {name}: {message(fn)}")

# A singular solve with `throw=False` and NaN checks on: returned, `singular`.
# (The right-hand side is not in the range: `b / 0`, not `0 / 0`, at the pivot.)
upper = matrix(np.array([[1.0, 1.0], [0.0, 0.0]]))
rank1 = matrix(np.array([[1.0, 2.0], [3.0, 6.0]]))
rhs2 = jnp.asarray([1.0, 1.0])
with jax.debug_nans(True):
    for name, fn in [
        ("LU", lambda: lx.linear_solve(rank1, rhs2, lx.LU(), throw=False)),
        ("LU-transposed", lambda: lx.linear_solve(
            rank1.T, rhs2, lx.LU(), throw=False)),
        ("LU-jit", lambda: eqx.filter_jit(lx.linear_solve)(
            rank1, rhs2, lx.LU(), throw=False)),
        ("Auto", lambda: lx.linear_solve(rank1, rhs2, throw=False)),
        ("Triangular", lambda: lx.linear_solve(
            lx.TaggedLinearOperator(upper, lx.upper_triangular_tag), rhs2,
            lx.Triangular(), throw=False)),
    ]:
        try:
            sol = fn()
            print(f"nans-nothrow {name}: {sol.result == lx.RESULTS.singular} "
                  f"{np.asarray(sol.value).tolist()}")
        except Exception as e:
            print(f"nans-nothrow {name}: EXC {type(e).__name__}: "
                  + " ".join(str(e).split())[:200])

# Jitted structured solves with implicit host-to-device transfers disallowed.
blocks = [[matrix(a[i:i + 2, j:j + 2]) for j in (0, 2)] for i in (0, 2)]
u, v = rng.normal(size=(n, 1)), rng.normal(size=(1, n))
for name, op, solver, m, rhs_, split in [
    ("Woodbury", lx.LowRankUpdateLinearOperator(
        matrix(a), jnp.asarray(u), jnp.eye(1), jnp.asarray(v)), lx.Woodbury(),
     a + u @ v, vec, False),
    ("Schur", lx.BlockLinearOperator(blocks), lx.Schur(), a,
     (vec[:2], vec[2:]), True),
    ("BlockDiagonal", lx.BlockDiagonalLinearOperator(
        [matrix(a), matrix(spd, lx.positive_semidefinite_tag)]),
     lx.BlockDiagonal(), np.block([[a, 0 * a], [0 * a, spd]]), (vec, vec), True),
]:
    solve = eqx.filter_jit(lambda op, b: lx.linear_solve(op, b, solver).value)
    want = np.linalg.solve(m, np.concatenate([b, b]) if name == "BlockDiagonal" else b)
    with jax.transfer_guard("disallow"):
        report(
            f"guard {name}",
            lambda: (jnp.concatenate(solve(op, rhs_)) if split else solve(op, rhs_),
                     want),
        )
"""


@functools.cache
def _lines() -> dict[str, str]:
    proc = run_python(_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {}
    for line in proc.stdout.splitlines():
        name, _, rest = line.partition(": ")
        out[name] = rest
    return out


def _solved(name: str) -> None:
    line = _lines()[name]
    assert line.startswith("OK"), line
    error: Float[np.ndarray, ""] = np.asarray(float(line.split()[1]))
    assert error < 1e-8


def test_minres_under_debug_infs_and_disable_jit():
    # `jax.disable_jit()` is how JAX's docs locate the operation that made a NaN
    # or infinity. Every MINRES solve raised `FloatingPointError: invalid value
    # (inf) encountered in mul` there with `jax_debug_infs`: its test of
    # `gmax > gmin / (10 eps)` multiplied `gmin`'s start, the largest float, by
    # 1 / (10 eps) before the first step.
    _solved("nojit-debug MINRES")


@pytest.mark.parametrize(
    "solver", ["LU", "Cholesky", "CG", "GMRES", "LSMR", "SVD-pinv"]
)
def test_other_solvers_under_debug_checks_and_disable_jit(solver):
    # Reviewed and found right; kept as a guard (the SVD one is a pseudoinverse
    # of a singular diagonal, finite, so it must not trip either).
    _solved(f"nojit-debug {solver}")


@pytest.mark.parametrize("case", ["LU", "invert", "Cholesky", "Tridiagonal"])
def test_failed_unjitted_solve_under_debug_nans_says_why(case):
    # With `jax_debug_nans`, an un-jitted solve of a singular operator raised
    # JAX's `InternalFloatingPointError: ('jit(_solve_triangular)', 'nan')` (LU,
    # `lx.invert(...).mv`) or `FloatingPointError: invalid value (nan)
    # encountered in cholesky`: JAX checks the compiled solve's NaN output before
    # lineax reads its result code. lineax 0.1.1 (its check inside the program)
    # said the operator is singular; so does this.
    line = _lines()[f"nans-singular {case}"]
    assert line.startswith("EquinoxRuntimeError"), line
    assert "singular" in line, line


@pytest.mark.parametrize(
    "case", ["LU", "LU-transposed", "LU-jit", "Auto", "Triangular"]
)
def test_singular_solve_without_throw_under_debug_nans(case):
    # With `throw=False`, a singular LU (or triangular) solve is returned with
    # `RESULTS.singular`. Under `jax_debug_nans` it raised JAX's
    # `FloatingPointError: invalid value (nan) encountered in sqrt`: the solution
    # was made NaN at the zero pivot (`[-inf, nan]`), which JAX checks as the
    # program returns. lineax 0.1.1 returned `[-inf, inf]` and `singular`; so
    # does this (infinity at the zero pivot, as substitution's `b / 0`).
    line = _lines()[f"nans-nothrow {case}"]
    assert line.startswith("True "), line
    value = np.asarray(eval(line[len("True ") :], {"inf": np.inf, "nan": np.nan}))
    assert not np.isnan(value).any(), line
    assert np.isinf(value).any(), line


@pytest.mark.parametrize("solver", ["Woodbury", "Schur", "BlockDiagonal"])
def test_jitted_structured_solve_under_transfer_guard(solver):
    # Under `jax.transfer_guard("disallow")` a `jit` of these solves failed to
    # trace: merging their inner solves' result codes compared Equinox's
    # concrete `RESULTS` items, which Equinox does eagerly (a host-to-device
    # transfer of a Python bool): "Disallowed host-to-device transfer".
    _solved(f"guard {solver}")


_BREAKPOINT_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
import lineax as lx
a = np.array([[4.0, 1.0], [2.0, 3.0]])
b = np.array([1.0, 2.0])
x = lx.linear_solve(lx.MatrixLinearOperator(jnp.asarray(a)), jnp.asarray(b)).value
print(float(np.max(np.abs(np.asarray(x) - np.linalg.solve(a, b)))))
"""


def test_import_and_solve_under_eqx_on_error_breakpoint():
    # `EQX_ON_ERROR=breakpoint`, Equinox's debugging mode, replaces `jax.jit` by
    # a wrapper that takes the function first; `jax.experimental.sparse`, which
    # lineax imported after Equinox, decorates with `@jax.jit(static_argnames=
    # ...)`: `import lineax` failed with `TypeError: jit() missing 1 required
    # positional argument: 'fun'`. lineax 0.1.1 imported. (The flag is read at
    # import: a subprocess. A successful solve, so no debugger opens.)
    proc = run_python(
        _BREAKPOINT_SCRIPT,
        env={"EQX_ON_ERROR": "breakpoint"},
        timeout=120,
        python_args=("-W", "ignore"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    error: Float[np.ndarray, ""] = np.asarray(float(proc.stdout.split()[-1]))
    assert error < 1e-12


def test_concrete_result_codes_are_decided_without_a_transfer():
    # `results_where` of concrete codes and predicate (a flag known at trace
    # time) ran Equinox's `RESULTS.where`, an eager `jnp.where` while the solve is
    # traced: under `jax.transfer_guard("disallow")` the `jit` failed to trace
    # ("Disallowed host-to-device transfer"). (`first_failure` had its own NumPy
    # path for that; both now use `results_where`'s.)
    import jax
    import jax.numpy as jnp

    from lineax._solution import RESULTS, results_where

    @jax.jit
    def codes(x):
        picked = results_where(False, RESULTS.conlim, RESULTS.max_steps_reached)
        kept = results_where(x > 0, picked, RESULTS.breakdown)
        return picked._value, kept._value

    x = jnp.asarray(1.0)
    with jax.transfer_guard("disallow"):
        picked, kept = codes(x)
    want = RESULTS.max_steps_reached._value
    assert int(picked) == int(want) and int(kept) == int(want)
