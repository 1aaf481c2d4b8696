"""The benchmark cases: for each, a function using lineax and the closest
JAX-native call, their arguments, the targets set by issue 6, and a check of
the answers.

A case puts its arrays on the device only when it is built (`Case.build()`),
so that listing or filtering cases costs nothing.
"""

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import _problems as P
import jax
import jax.numpy as jnp
import jax.scipy as jsp
import jax.scipy.sparse.linalg as jssl
import numpy as np

import lineax as lx


@dataclasses.dataclass
class Built:
    """One case's functions and their device arrays, ready to compile."""

    lib_fn: Callable
    lib_args: tuple
    jax_fn: Callable
    jax_args: tuple
    # check(lib_out, jax_out) -> the fields of `extra` in results.json:
    # `rel_diff` (always), and for iterative solvers the true residuals,
    # iteration and matrix-vector product counts, and lineax's outcome.
    check: Callable[[Any, Any], dict]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    group: str  # dense | grad | batch | tridiag | krylov | unjitted
    baseline: str  # the JAX-native call compared against
    build: Callable[[], Built]
    # Issue 6 targets: the ratio lineax / JAX should be at most these.
    run_target: float | None = None
    compile_target: float | None = None
    note: str = ""
    # Called from Python without `jax.jit` (timed call by call).
    unjitted: bool = False
    # Direct solvers: the largest relative difference from JAX's answer that
    # still counts as the same answer.
    diff_tol: float | None = None
    # Iterative solvers: the relative tolerance asked of both libraries, and
    # whether lineax must reach it. `False` for problems that sit below the
    # dtype's round-off floor on purpose: there, stopping with an honest
    # failure is right, and only a false "successful" (or a much worse answer
    # than JAX's) misses the target.
    rtol: float | None = None
    must_converge: bool = True
    # The true residual at which lineax documents `successful` although it is
    # above `rtol`: LSMR's level "as good as the dtype allows",
    # `max(rtol, 10 eps cond)` (see `lx.LSMR`'s stopping rule), as SciPy's `lsmr`
    # and lineax 0.1.1 report such answers successful too.
    success_floor: float | None = None


# ---------------------------------------------------------------------------
# helpers


def _put(x, dtype):
    return jax.device_put(jnp.asarray(x, dtype=dtype))


def _rel_diff(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _answers_diff(lib_out, jax_out) -> dict:
    pairs = zip(jax.tree_util.tree_leaves(lib_out), jax.tree_util.tree_leaves(jax_out))
    return {"rel_diff": max(_rel_diff(x, y) for x, y in pairs)}


def _diff_tol(dtype) -> float:
    return 1e-9 if jnp.dtype(dtype) == jnp.float64 else 1e-3


def _direct_case(
    name: str,
    group: str,
    baseline: str,
    lib_fn: Callable,
    jax_fn: Callable,
    arrays: tuple,
    dtype,
    *,
    jax_arrays: tuple | None = None,
    check: Callable[[Any, Any], dict] = _answers_diff,
    **fields,
) -> Case:
    """A case whose two sides are judged by how much their answers differ.
    Both take `arrays` (NumPy, put on the device as `dtype`) unless JAX's call
    takes them in another layout (`jax_arrays`)."""

    def build():
        lib_args = tuple(_put(x, dtype) for x in arrays)
        jax_args = (
            lib_args
            if jax_arrays is None
            else tuple(_put(x, dtype) for x in jax_arrays)
        )
        return Built(lib_fn, lib_args, jax_fn, jax_args, check)

    return Case(name, group, baseline, build, diff_tol=_diff_tol(dtype), **fields)


def _lineax_solve(solver: lx.AbstractLinearSolver, tags=()) -> Callable:
    """`(A, b) -> x` through `lineax.linear_solve` with a matrix operator."""

    def solve(A, b):
        return lx.linear_solve(lx.MatrixLinearOperator(A, tags), b, solver).value

    return solve


def _jnp_solve(A, b):
    return jnp.linalg.solve(A, b)


def _jnp_lstsq(A, b):
    return jnp.linalg.lstsq(A, b)[0]


def _cho_solve(A, b):
    return jsp.linalg.cho_solve(jsp.linalg.cho_factor(A), b)


# ---------------------------------------------------------------------------
# dense solves, gradients, batching, tridiagonal, un-jitted


def _dense_cases(n: int, dtype) -> list[Case]:
    general, spd, b = P.dense_matrix(n, 0), P.spd_matrix(n, 0), P.vector(n, 1)
    psd = (lx.positive_semidefinite_tag,)
    qr_note = "square QR against LU-based jnp.linalg.solve (QR does ~2x the flops)"
    rows = [  # name, lineax solver, tags, matrix, JAX call, its name, note
        ("lu", lx.LU(), (), general, _jnp_solve, "jnp.linalg.solve", ""),
        ("qr", lx.QR(), (), general, _jnp_solve, "jnp.linalg.solve", qr_note),
        ("svd", lx.SVD(), (), general, _jnp_lstsq, "jnp.linalg.lstsq", ""),
        (
            "cholesky",
            lx.Cholesky(),
            psd,
            spd,
            _cho_solve,
            "jax.scipy.linalg.cho_solve(cho_factor)",
            "",
        ),
        (
            "auto",
            lx.AutoLinearSolver(well_posed=True),
            (),
            general,
            _jnp_solve,
            "jnp.linalg.solve",
            "",
        ),
    ]
    return [
        _direct_case(
            f"dense_{name}_n{n}",
            "dense",
            baseline,
            _lineax_solve(solver, tags),
            jax_fn,
            (A, b),
            dtype,
            run_target=1.02,
            compile_target=1.2,
            note=note,
        )
        for name, solver, tags, A, jax_fn, baseline, note in rows
    ]


def _grad_of(solve: Callable) -> Callable:
    """d/dA and d/db of `sum(solve(A, b) ** 2)`."""

    def loss(A, b):
        return jnp.sum(solve(A, b) ** 2)

    return jax.grad(loss, argnums=(0, 1))


def _grad_case(name, solver, jax_solve, baseline, A, b, dtype, **fields) -> Case:
    return _direct_case(
        name,
        "grad",
        f"grad of {baseline}",
        _grad_of(_lineax_solve(solver)),
        _grad_of(jax_solve),
        (A, b),
        dtype,
        **fields,
    )


def _vmap_case(batch: int, n: int, dtype) -> Case:
    r = P.rng(6)
    A = r.standard_normal((batch, n, n)) / np.sqrt(n) + 2.0 * np.eye(n)
    b = r.standard_normal((batch, n))
    return _direct_case(
        f"vmap_lu_{batch}x{n}",
        "batch",
        "vmap(jnp.linalg.solve)",
        jax.vmap(_lineax_solve(lx.LU())),
        jax.vmap(_jnp_solve),
        (A, b),
        dtype,
        run_target=1.02,
    )


def _many_rhs_case(n: int, k: int, dtype) -> Case:
    A = P.dense_matrix(n, 7)
    B = P.vector(n, 8, batch=(k,))  # (k, n): one right-hand side per row

    def lib_fn(A, B):
        op = lx.MatrixLinearOperator(A)
        return jax.vmap(lambda b: lx.linear_solve(op, b, lx.LU()).value)(B)

    def check(lib_out, jax_out):
        return {"rel_diff": _rel_diff(lib_out, np.asarray(jax_out).T)}

    return _direct_case(
        f"many_rhs_n{n}_k{k}",
        "batch",
        "jnp.linalg.solve(A, (n,k) matrix)",
        lib_fn,
        _jnp_solve,  # with the right-hand sides as the columns of an (n, k) matrix
        (A, B),
        dtype,
        jax_arrays=(A, B.T),
        check=check,
        run_target=1.05,
        note="one operator, vmap over the right-hand sides",
    )


def _many_rhs_diagonal_case(n: int, k: int, dtype) -> Case:
    d = 1.0 + P.rng(14).uniform(size=n)
    B = P.vector(n, 15, batch=(k,))

    def lib_fn(d, B):
        op = lx.DiagonalLinearOperator(d)
        return jax.vmap(lambda b: lx.linear_solve(op, b, lx.Diagonal()).value)(B)

    return _direct_case(
        f"many_rhs_diagonal_n{n}_k{k}",
        "batch",
        "B / d",
        lib_fn,
        lambda d, B: B / d,
        (d, B),
        dtype,
        note="vmap over the right-hand sides; the finiteness test stacked the "
        "diagonal to the batch before 9c9959d (3.5x)",
    )


def _tridiag_case(n: int, dtype) -> Case:
    d, lo, up = P.tridiagonal(n, 9)
    b = P.vector(n, 10)
    zero = np.zeros(1)

    def lib_fn(d, lo, up, b):
        op = lx.TridiagonalLinearOperator(d, lo, up)
        return lx.linear_solve(op, b, lx.Tridiagonal()).value

    def jax_fn(dl, d, du, b):
        return jax.lax.linalg.tridiagonal_solve(dl, d, du, b[:, None])[:, 0]

    return _direct_case(
        f"tridiag_n{n}",
        "tridiag",
        "lax.linalg.tridiagonal_solve",
        lib_fn,
        jax_fn,
        (d, lo, up, b),
        dtype,
        # LAPACK's layout: the off-diagonals padded to length n.
        jax_arrays=(np.concatenate([zero, lo]), d, np.concatenate([up, zero]), b),
        run_target=1.02,
    )


def _unjitted_case(n: int, dtype) -> Case:
    return _direct_case(
        f"unjitted_n{n}",
        "unjitted",
        "un-jitted jnp.linalg.solve",
        lambda A, b: lx.linear_solve(lx.MatrixLinearOperator(A), b).value,
        _jnp_solve,
        (P.dense_matrix(n, 12), P.vector(n, 13)),
        dtype,
        unjitted=True,
        run_target=1.3,
        note="called from Python, the operator built at each call",
    )


def _unjitted_inverse_case(n: int, dtype) -> Case:
    # One factorisation per matrix (kept by its id, with the matrix), as a loop
    # of solves with `lx.invert(...)` or `lu_factor` makes it.
    inverses, factors = {}, {}

    def lib_fn(A, b):
        if id(A) not in inverses:
            inverses[id(A)] = (A, lx.invert(lx.MatrixLinearOperator(A), lx.LU()))
        return inverses[id(A)][1].mv(b)

    def jax_fn(A, b):
        if id(A) not in factors:
            factors[id(A)] = (A, jax.scipy.linalg.lu_factor(A))
        return jax.scipy.linalg.lu_solve(factors[id(A)][1], b)

    return _direct_case(
        f"unjitted_inverse_n{n}",
        "unjitted",
        "un-jitted lu_solve(lu_factor(A), b)",
        lib_fn,
        jax_fn,
        (P.dense_matrix(n, 16), P.vector(n, 17)),
        dtype,
        unjitted=True,
        note="lx.invert(op).mv(b) called from Python; op by op before 6e81f63 "
        "(5x, n = 300)",
    )


# ---------------------------------------------------------------------------
# iterative solvers


def _iterative_outputs(sol: lx.Solution) -> tuple:
    return sol.value, sol.stats["num_steps"], sol.result


def _first_clause(message: str) -> str:
    return re.split(r"[.:]", message, maxsplit=1)[0]


def _iterative_check(residual: Callable, lib_out, jax_out) -> dict:
    """Both answers' residuals (`residual(x)`, in float64), lineax's iteration
    count and outcome (the first sentence of its `RESULTS` message)."""
    value, steps, result = lib_out
    successful = bool(result == lx.RESULTS.successful)
    return dict(
        lib_residual=residual(value),
        jax_residual=residual(jax_out),
        lib_steps=int(steps),
        lib_successful=successful,
        lib_outcome="successful" if successful else _first_clause(lx.RESULTS[result]),
        rel_diff=_rel_diff(value, jax_out),
    )


def _count_matvecs(fn_of_mv: Callable, mv: Callable, args: tuple) -> int | None:
    """How many times `fn_of_mv(mv)(*args)` calls `mv`, counted on the host."""
    count = [0]

    def bump():
        count[0] += 1

    def counted(x):
        jax.debug.callback(bump)
        return mv(x)

    try:
        jax.block_until_ready(jax.jit(fn_of_mv(counted))(*args))
    except Exception:  # noqa: BLE001 - callbacks may be unsupported
        return None
    return count[0]


# One matrix-free problem per method: CG needs a symmetric positive definite
# operator, the others get a nonsymmetric (convection-diffusion) one.
_KRYLOV = {
    lx.CG: (jssl.cg, "poisson", 0.0, (lx.positive_semidefinite_tag,)),
    lx.GMRES: (jssl.gmres, "convdiff", P.CONVECTION, ()),
    lx.BiCGStab: (jssl.bicgstab, "convdiff", P.CONVECTION, ()),
}


def _krylov_case(
    method: type[lx.AbstractLinearSolver],
    N: int,
    dtype,
    rtol: float,
    *,
    shift: float = P.SHIFT,
    must_converge: bool = True,
    run_target: float | None = 1.0,
    note: str = "",
) -> Case:
    jax_solver, problem, convection, tags = _KRYLOV[method]
    if shift != P.SHIFT:
        problem += f"_shift{shift:g}"
    b = P.vector(N * N, 11)
    mv = P.stencil_mv(jnp, N, convection, shift)
    # lineax is given the 2-norm, so both stop on ||r||_2 <= rtol ||b||_2.
    solver = method(rtol=rtol, atol=0.0, norm=lx.internal.two_norm)
    struct = jax.ShapeDtypeStruct((N * N,), dtype)

    def jax_with(mv):
        def jax_fn(b):
            return jax_solver(mv, b, tol=rtol, atol=0.0)[0]

        return jax_fn

    def lib_with(mv):
        def lib_fn(b):
            op = lx.FunctionLinearOperator(mv, struct, tags)
            return _iterative_outputs(lx.linear_solve(op, b, solver, throw=False))

        return lib_fn

    def build():
        args = (_put(b, dtype),)

        def residual(x):
            return P.true_relative_residual(N, convection, x, b, shift)

        def check(lib_out, jax_out):
            return dict(
                _iterative_check(residual, lib_out, jax_out),
                lib_matvecs=_count_matvecs(lib_with, mv, args),
                jax_matvecs=_count_matvecs(jax_with, mv, args),
            )

        return Built(lib_with(mv), args, jax_with(mv), args, check)

    return Case(
        f"{method.__name__.lower()}_{problem}_N{N}",
        "krylov",
        f"jax.scipy.sparse.linalg.{jax_solver.__name__}",
        build,
        run_target=run_target,
        note=note or f"{N}x{N} grid, shift {shift:g}",
        rtol=rtol,
        must_converge=must_converge,
    )


def _lsmr_case(m: int, n: int, cond: float, dtype, rtol: float, **fields) -> Case:
    """LSMR on a dense least-squares problem against `jnp.linalg.lstsq`; the
    residuals are those of the normal equations, ||A^T r|| / (||A|| ||r||)."""
    A, b = P.conditioned_tall_matrix(m, n, cond, 14), P.vector(m, 15)
    solver = lx.LSMR(rtol=rtol, atol=0.0)

    def lib_fn(A, b):
        sol = lx.linear_solve(lx.MatrixLinearOperator(A), b, solver, throw=False)
        return _iterative_outputs(sol)

    def build():
        args = (_put(A, dtype), _put(b, dtype))

        def residual(x):
            return P.normal_equations_residual(args[0], x, args[1])

        check = functools.partial(_iterative_check, residual)
        return Built(lib_fn, args, _jnp_lstsq, args, check)

    return Case(
        f"lsmr_tall_{m}x{n}_cond{cond:g}",
        "krylov",
        "jnp.linalg.lstsq",
        build,
        rtol=rtol,
        **fields,
    )


# ---------------------------------------------------------------------------


SIZES = {
    "cpu": dict(
        dense=(100, 500),
        grad_lu=(100, 500),
        lstsq=((200, 100),),
        vmap=((200, 50),),
        # (300, 3000): the finiteness test once broadcast the matrix to the batch
        # of right-hand sides there, 58x the time of JAX.
        many_rhs=((500, 100), (300, 3000)),
        many_rhs_diagonal=((1000, 3000),),
        tridiag=(10_000,),
        krylov=(64, 256),
        krylov_floor=(256, 512),
        lsmr=(2000, 400),
        unjitted=10,
        unjitted_inverse=300,
    ),
    "gpu": dict(
        dense=(1000, 4096),
        grad_lu=(1000, 4096),
        lstsq=((200, 100), (2000, 1000)),
        vmap=((200, 50), (20_000, 50)),
        many_rhs=((4096, 100),),
        many_rhs_diagonal=((100_000, 1000),),
        tridiag=(1_000_000,),
        krylov=(256, 1024),
        krylov_floor=(256, 512, 1024),
        lsmr=(2000, 400),
        unjitted=10,
        unjitted_inverse=300,
    ),
}


def all_cases(scale: str, x64: bool) -> list[Case]:
    dtype = jnp.float64 if x64 else jnp.float32
    rtol = 1e-10 if x64 else 1e-5
    s = SIZES[scale]
    cases = []
    for n in s["dense"]:
        cases += _dense_cases(n, dtype)
    for n in s["grad_lu"]:
        A, b = P.dense_matrix(n, 2), P.vector(n, 3)
        cases.append(
            _grad_case(
                f"grad_lu_n{n}", lx.LU(), _jnp_solve, "jnp.linalg.solve", A, b, dtype
            )
        )
    for m, n in s["lstsq"]:
        A, b = P.tall_matrix(m, n, 4), P.vector(m, 5)
        cases.append(
            _grad_case(
                f"grad_lstsq_qr_{m}x{n}",
                lx.QR(),
                _jnp_lstsq,
                "jnp.linalg.lstsq",
                A,
                b,
                dtype,
                run_target=0.1,
                note="least squares; jnp.linalg.lstsq differentiates through an SVD",
            )
        )
    cases += [_vmap_case(bt, n, dtype) for bt, n in s["vmap"]]
    cases += [_many_rhs_case(n, k, dtype) for n, k in s["many_rhs"]]
    cases += [_many_rhs_diagonal_case(n, k, dtype) for n, k in s["many_rhs_diagonal"]]
    cases += [_tridiag_case(n, dtype) for n in s["tridiag"]]
    for N in s["krylov"]:
        cases += [_krylov_case(method, N, dtype, rtol) for method in _KRYLOV]
    # Problems at the float32 round-off floor, where float32 CG used to diverge:
    # a nearly singular Poisson operator at rtol 1e-5, and a least-squares
    # problem at rtol 1e-7 (below float32's reach). JAX's CG trusts its
    # recursively updated residual, which drifts here, so it stops early and
    # the two run times are not of the same work: no run-time target.
    floor = "" if x64 else "; at float32's round-off floor"
    for N in s["krylov_floor"]:
        cases.append(
            _krylov_case(
                lx.CG,
                N,
                dtype,
                1e-5,
                shift=1e-4,
                must_converge=x64,
                run_target=None,
                note=f"{N}x{N} grid, shift 1e-4" + floor,
            )
        )
    cases.append(
        _lsmr_case(
            *s["lsmr"],
            1e3,
            dtype,
            1e-7,
            must_converge=x64,
            success_floor=min(10 * float(jnp.finfo(dtype).eps) * 1e3, 1e-2),
            note="condition number 1e3; residual ||A^T r|| / (||A|| ||r||)" + floor,
        )
    )
    cases.append(_unjitted_case(s["unjitted"], dtype))
    cases.append(_unjitted_inverse_case(s["unjitted_inverse"], dtype))
    return cases
