"""The benchmark cases: for each, a function using lineax and the closest
JAX-native call, their arguments, targets from issue 6, and a correctness check.

A case is built lazily (`Case.build()`), so a missing lineax name only marks
that case as missing instead of stopping the run.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import _problems as P
import jax
import jax.numpy as jnp
import jax.scipy as jsp
import jax.scipy.sparse.linalg as jssl
import numpy as np


try:
    import lineax as lx
except ImportError as e:  # the library may not be importable yet
    lx = None
    LINEAX_IMPORT_ERROR = repr(e)
else:
    LINEAX_IMPORT_ERROR = None
    if getattr(lx, "__file__", None) is None:  # a bare namespace package
        LINEAX_IMPORT_ERROR = f"lineax has no __init__.py ({list(lx.__path__)})"
        lx = None


class Missing(Exception):
    """The lineax side of a case cannot be built (a name is missing)."""


def _lx(name: str):
    """`lx.<name>`, or raise `Missing` (never an AttributeError deep inside)."""
    if lx is None:
        raise Missing(f"import lineax failed: {LINEAX_IMPORT_ERROR}")
    obj = lx
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise Missing(f"lineax.{name} does not exist") from None
    return obj


@dataclasses.dataclass
class Built:
    jax_fn: Callable
    jax_args: tuple
    lib_fn: Callable | None = None  # None: missing, see `lib_missing`
    lib_args: tuple = ()
    lib_missing: str | None = None
    # check(lib_out, jax_out) -> dict of extra columns (residuals, iterations)
    check: Callable[[Any, Any], dict] | None = None
    unjitted: bool = False
    raw_args: tuple = ()  # un-jitted case: the arrays, for the breakdown


@dataclasses.dataclass
class Case:
    name: str
    group: str  # dense | grad | batch | tridiag | krylov | unjitted
    baseline: str  # the JAX-native call compared against
    build: Callable[[], Built]
    # Issue 6 targets: ratio lineax / JAX must be <= these.
    run_target: float | None = None
    compile_target: float | None = None
    note: str = ""


# ---------------------------------------------------------------------------
# helpers


def _put(x, dtype):
    return jax.device_put(jnp.asarray(x, dtype=dtype))


def _rel_diff(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _tree_rel_diff(a, b) -> float:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return max(_rel_diff(x, y) for x, y in zip(la, lb))


def _check_diff(lib_out, jax_out) -> dict:
    if lib_out is None:
        return {}
    return {"rel_diff": _tree_rel_diff(lib_out, jax_out)}


def _lib_side(built_jax: dict, make_lib: Callable[[], tuple[Callable, tuple]]) -> Built:
    """Fills in the lineax side, recording it as missing if it can't be built."""
    try:
        fn, args = make_lib()
    except Missing as e:
        return Built(**built_jax, lib_missing=str(e))
    return Built(**built_jax, lib_fn=fn, lib_args=args)


# ---------------------------------------------------------------------------
# dense solves


def _dense_case(solver_name: str, n: int, dtype) -> Case:
    spd = solver_name == "Cholesky"
    A = P.spd_matrix(n, 0) if spd else P.dense_matrix(n, 0)
    b = P.vector(n, 1)

    if solver_name == "SVD":
        baseline = "jnp.linalg.lstsq"

        def jax_fn(A, b):
            return jnp.linalg.lstsq(A, b)[0]
    elif solver_name == "Cholesky":
        baseline = "jax.scipy.linalg.cho_solve(cho_factor)"

        def jax_fn(A, b):
            return jsp.linalg.cho_solve(jsp.linalg.cho_factor(A), b)
    else:
        baseline = "jnp.linalg.solve"

        def jax_fn(A, b):
            return jnp.linalg.solve(A, b)

    def build():
        Ad, bd = _put(A, dtype), _put(b, dtype)

        def make_lib():
            if solver_name == "Auto":
                solver = _lx("AutoLinearSolver")(well_posed=True)
            else:
                solver = _lx(solver_name)()
            tags = (_lx("positive_semidefinite_tag"),) if spd else ()
            Op = _lx("MatrixLinearOperator")
            solve = _lx("linear_solve")

            def lib_fn(A, b):
                return solve(Op(A, tags), b, solver).value

            return lib_fn, (Ad, bd)

        return _lib_side(
            dict(jax_fn=jax_fn, jax_args=(Ad, bd), check=_check_diff), make_lib
        )

    note = ""
    if solver_name == "QR":
        note = "square QR vs LU-based jnp.linalg.solve (QR does ~2x the flops)"
    if solver_name == "SVD":
        note = "jnp.linalg.lstsq is SVD-based"
    return Case(
        f"dense_{solver_name.lower()}_n{n}",
        "dense",
        baseline,
        build,
        run_target=1.02,
        compile_target=1.2,
        note=note,
    )


# ---------------------------------------------------------------------------
# gradients


def _grad_lu_case(n: int, dtype) -> Case:
    A, b = P.dense_matrix(n, 2), P.vector(n, 3)

    def jax_fn(A, b):
        return jax.grad(
            lambda A, b: jnp.sum(jnp.linalg.solve(A, b) ** 2), argnums=(0, 1)
        )(A, b)

    def build():
        Ad, bd = _put(A, dtype), _put(b, dtype)

        def make_lib():
            Op, solve, LU = (
                _lx("MatrixLinearOperator"),
                _lx("linear_solve"),
                _lx("LU"),
            )

            def loss(A, b):
                return jnp.sum(solve(Op(A), b, LU()).value ** 2)

            return (lambda A, b: jax.grad(loss, argnums=(0, 1))(A, b)), (Ad, bd)

        return _lib_side(
            dict(jax_fn=jax_fn, jax_args=(Ad, bd), check=_check_diff), make_lib
        )

    return Case(
        f"grad_lu_n{n}",
        "grad",
        "grad of jnp.linalg.solve",
        build,
        note="d/dA and d/db of sum(x**2)",
    )


def _grad_lstsq_case(m: int, n: int, dtype) -> Case:
    A, b = P.tall_matrix(m, n, 4), P.vector(m, 5)

    def jax_fn(A, b):
        return jax.grad(
            lambda A, b: jnp.sum(jnp.linalg.lstsq(A, b)[0] ** 2), argnums=(0, 1)
        )(A, b)

    def build():
        Ad, bd = _put(A, dtype), _put(b, dtype)

        def make_lib():
            Op, solve, QR = (
                _lx("MatrixLinearOperator"),
                _lx("linear_solve"),
                _lx("QR"),
            )

            def loss(A, b):
                return jnp.sum(solve(Op(A), b, QR()).value ** 2)

            return (lambda A, b: jax.grad(loss, argnums=(0, 1))(A, b)), (Ad, bd)

        return _lib_side(
            dict(jax_fn=jax_fn, jax_args=(Ad, bd), check=_check_diff), make_lib
        )

    return Case(
        f"grad_lstsq_qr_{m}x{n}",
        "grad",
        "grad of jnp.linalg.lstsq",
        build,
        run_target=0.1,
        note="least squares; lstsq differentiates through an SVD",
    )


# ---------------------------------------------------------------------------
# batching


def _vmap_small_case(batch: int, n: int, dtype) -> Case:
    r = P.rng(6)
    A = r.standard_normal((batch, n, n)) / np.sqrt(n) + 2.0 * np.eye(n)
    b = r.standard_normal((batch, n))

    def jax_fn(A, b):
        return jax.vmap(jnp.linalg.solve)(A, b)

    def build():
        Ad, bd = _put(A, dtype), _put(b, dtype)

        def make_lib():
            Op, solve, LU = (
                _lx("MatrixLinearOperator"),
                _lx("linear_solve"),
                _lx("LU"),
            )

            def one(A, b):
                return solve(Op(A), b, LU()).value

            return (lambda A, b: jax.vmap(one)(A, b)), (Ad, bd)

        return _lib_side(
            dict(jax_fn=jax_fn, jax_args=(Ad, bd), check=_check_diff), make_lib
        )

    return Case(
        f"vmap_lu_{batch}x{n}",
        "batch",
        "vmap(jnp.linalg.solve)",
        build,
        run_target=1.02,
    )


def _many_rhs_case(n: int, k: int, dtype) -> Case:
    A = P.dense_matrix(n, 7)
    B = P.vector(n, 8, batch=(k,))  # (k, n): one right-hand side per row

    def jax_fn(A, Bt):
        return jnp.linalg.solve(A, Bt)  # (n, k) matrix right-hand side

    def build():
        Ad, Bd, Btd = _put(A, dtype), _put(B, dtype), _put(B.T, dtype)

        def make_lib():
            Op, solve, LU = (
                _lx("MatrixLinearOperator"),
                _lx("linear_solve"),
                _lx("LU"),
            )

            def lib_fn(A, B):
                op = Op(A)
                return jax.vmap(lambda b: solve(op, b, LU()).value)(B)

            return lib_fn, (Ad, Bd)

        def check(lib_out, jax_out):
            if lib_out is None:
                return {}
            return {"rel_diff": _rel_diff(lib_out, np.asarray(jax_out).T)}

        return _lib_side(dict(jax_fn=jax_fn, jax_args=(Ad, Btd), check=check), make_lib)

    return Case(
        f"many_rhs_n{n}_k{k}",
        "batch",
        "jnp.linalg.solve(A, (n,k) matrix)",
        build,
        run_target=1.05,
        note="vmap over the vector only; operator shared",
    )


# ---------------------------------------------------------------------------
# tridiagonal


def _tridiag_case(n: int, dtype) -> Case:
    d, lo, up = P.tridiagonal(n, 9)
    b = P.vector(n, 10)
    zero = np.zeros(1)

    def jax_fn(dl, d, du, b):
        return jax.lax.linalg.tridiagonal_solve(dl, d, du, b[:, None])[:, 0]

    def build():
        jargs = (
            _put(np.concatenate([zero, lo]), dtype),
            _put(d, dtype),
            _put(np.concatenate([up, zero]), dtype),
            _put(b, dtype),
        )

        def make_lib():
            Op, solve, Tri = (
                _lx("TridiagonalLinearOperator"),
                _lx("linear_solve"),
                _lx("Tridiagonal"),
            )

            def lib_fn(d, lo, up, b):
                return solve(Op(d, lo, up), b, Tri()).value

            return lib_fn, tuple(_put(x, dtype) for x in (d, lo, up, b))

        return _lib_side(
            dict(jax_fn=jax_fn, jax_args=jargs, check=_check_diff), make_lib
        )

    return Case(
        f"tridiag_n{n}",
        "tridiag",
        "lax.linalg.tridiagonal_solve",
        build,
        run_target=1.02,
        note="target: parity (not set by the issue)",
    )


# ---------------------------------------------------------------------------
# Krylov


def _count_matvecs(mv):
    """`mv` plus a host-side counter of how often it is called."""
    count = [0]

    def bump():
        count[0] += 1

    def counted(x):
        jax.debug.callback(bump)
        return mv(x)

    return counted, count


def _krylov_case(
    method: str, N: int, dtype, rtol: float, shift: float = P.SHIFT
) -> Case:
    convection = 0.0 if method == "CG" else P.CONVECTION
    problem = "poisson" if method == "CG" else "convdiff"
    if shift != P.SHIFT:
        problem += f"_shift{shift:g}"
    b = P.vector(N * N, 11)
    jax_solver = {"CG": jssl.cg, "GMRES": jssl.gmres, "BiCGStab": jssl.bicgstab}[method]
    mv = P.stencil_mv(jnp, N, convection, shift)

    def jax_with(mv):
        def jax_fn(b):
            return jax_solver(mv, b, tol=rtol, atol=0.0)[0]

        return jax_fn

    def build():
        bd = _put(b, dtype)

        def make_lib():
            Op, solve = _lx("FunctionLinearOperator"), _lx("linear_solve")
            Solver, two_norm = _lx(method), _lx("internal.two_norm")
            psd = _lx("positive_semidefinite_tag")
            successful = _lx("RESULTS").successful
            tags = (psd,) if method == "CG" else ()
            solver = Solver(rtol=rtol, atol=0.0, norm=two_norm)
            struct = jax.ShapeDtypeStruct((N * N,), dtype)

            def lib_with(mv):
                def lib_fn(b):
                    sol = solve(Op(mv, struct, tags), b, solver, throw=False)
                    return (sol.value, sol.stats["num_steps"], sol.result == successful)

                return lib_fn

            return lib_with, (bd,)

        try:
            lib_with, lib_args = make_lib()
        except Missing as e:
            lib_with, lib_args, missing = None, (), str(e)
        else:
            missing = None

        def matvecs(with_fn, args):
            counted, count = _count_matvecs(mv)
            try:
                jax.block_until_ready(jax.jit(with_fn(counted))(*args))
            except Exception:  # noqa: BLE001 - callbacks may be unsupported
                return None
            return count[0]

        def check(lib_out, jax_out):
            out = {
                "jax_residual": P.true_relative_residual(
                    N, convection, jax_out, b, shift
                ),
                "jax_matvecs": matvecs(jax_with, (bd,)),
            }
            if lib_out is not None:
                value, steps, ok = lib_out
                out.update(
                    lib_residual=P.true_relative_residual(
                        N, convection, value, b, shift
                    ),
                    lib_steps=int(steps),
                    lib_successful=bool(ok),
                    lib_matvecs=matvecs(lib_with, lib_args),
                    rel_diff=_rel_diff(value, jax_out),
                )
            return out

        return Built(
            jax_fn=jax_with(mv),
            jax_args=(bd,),
            lib_fn=None if lib_with is None else lib_with(mv),
            lib_args=lib_args,
            lib_missing=missing,
            check=check,
        )

    return Case(
        f"{method.lower()}_{problem}_N{N}",
        "krylov",
        f"jax.scipy.sparse.linalg.{method.lower()}",
        build,
        run_target=1.0,
        note=f"{N}x{N} grid, shift {shift:g}, rtol={rtol:g}, atol=0, 2-norm",
    )


def _lsmr_case(m: int, n: int, cond: float, dtype, rtol: float) -> Case:
    """LSMR on a dense least-squares problem against `jnp.linalg.lstsq`; the
    "residuals" are the normal-equations residuals ||A^T r|| / (||A|| ||r||)."""
    A, b = P.conditioned_tall_matrix(m, n, cond, 14), P.vector(m, 15)

    def jax_fn(A, b):
        return jnp.linalg.lstsq(A, b)[0]

    def build():
        Ad, bd = _put(A, dtype), _put(b, dtype)

        def make_lib():
            Op, solve = _lx("MatrixLinearOperator"), _lx("linear_solve")
            successful = _lx("RESULTS").successful
            solver = _lx("LSMR")(rtol=rtol, atol=0.0)

            def lib_fn(A, b):
                sol = solve(Op(A), b, solver, throw=False)
                return (sol.value, sol.stats["num_steps"], sol.result == successful)

            return lib_fn, (Ad, bd)

        def check(lib_out, jax_out):
            out = {"jax_residual": P.normal_equations_residual(Ad, jax_out, bd)}
            if lib_out is not None:
                value, steps, ok = lib_out
                out.update(
                    lib_residual=P.normal_equations_residual(Ad, value, bd),
                    lib_steps=int(steps),
                    lib_successful=bool(ok),
                    rel_diff=_rel_diff(value, jax_out),
                )
            return out

        return _lib_side(dict(jax_fn=jax_fn, jax_args=(Ad, bd), check=check), make_lib)

    return Case(
        f"lsmr_tall_{m}x{n}_cond{cond:g}",
        "krylov",
        "jnp.linalg.lstsq",
        build,
        note=f"cond {cond:g}, rtol={rtol:g}, atol=0; residual: ||A^T r||/(||A|| ||r||)",
    )


# ---------------------------------------------------------------------------
# un-jitted small solve


def _unjitted_case(n: int, dtype) -> Case:
    A, b = P.dense_matrix(n, 12), P.vector(n, 13)

    def build():
        Ad, bd = _put(A, dtype), _put(b, dtype)

        def jax_fn():
            return jnp.linalg.solve(Ad, bd)

        def make_lib():
            Op, solve = _lx("MatrixLinearOperator"), _lx("linear_solve")

            def lib_fn():
                return solve(Op(Ad), bd).value

            return lib_fn, ()

        built = _lib_side(dict(jax_fn=jax_fn, jax_args=(), check=_check_diff), make_lib)
        built.unjitted = True
        built.raw_args = (Ad, bd)
        return built

    return Case(
        f"unjitted_n{n}",
        "unjitted",
        "un-jitted jnp.linalg.solve",
        build,
        run_target=1.3,
        note="from Python, MatrixLinearOperator built each call",
    )


# ---------------------------------------------------------------------------


SIZES = {
    "cpu": dict(
        dense=(100, 500),
        grad_lu=(100, 500),
        lstsq=((200, 100),),
        vmap=((200, 50),),
        many_rhs=((500, 100),),
        tridiag=(10_000,),
        krylov=(64, 256),
        krylov_floor=(256, 512),
        lsmr=(2000, 400),
        unjitted=10,
    ),
    "gpu": dict(
        dense=(1000, 4096),
        grad_lu=(1000, 4096),
        lstsq=((200, 100), (2000, 1000)),
        vmap=((200, 50), (20_000, 50)),
        many_rhs=((4096, 100),),
        tridiag=(1_000_000,),
        krylov=(256, 1024),
        krylov_floor=(256, 512, 1024),
        lsmr=(2000, 400),
        unjitted=10,
    ),
}


def all_cases(scale: str, x64: bool) -> list[Case]:
    dtype = jnp.float64 if x64 else jnp.float32
    rtol = 1e-10 if x64 else 1e-5
    s = SIZES[scale]
    cases = []
    for n in s["dense"]:
        for solver in ("LU", "QR", "SVD", "Cholesky", "Auto"):
            cases.append(_dense_case(solver, n, dtype))
    cases += [_grad_lu_case(n, dtype) for n in s["grad_lu"]]
    cases += [_grad_lstsq_case(m, n, dtype) for m, n in s["lstsq"]]
    cases += [_vmap_small_case(bt, n, dtype) for bt, n in s["vmap"]]
    cases += [_many_rhs_case(n, k, dtype) for n, k in s["many_rhs"]]
    cases += [_tridiag_case(n, dtype) for n in s["tridiag"]]
    for N in s["krylov"]:
        for method in ("CG", "GMRES", "BiCGStab"):
            cases.append(_krylov_case(method, N, dtype, rtol))
    # Below the float32 floor (issue: CG diverged here): a nearly singular Poisson
    # operator with rtol 1e-5, and a least-squares problem with rtol 1e-7.
    for N in s["krylov_floor"]:
        cases.append(_krylov_case("CG", N, dtype, 1e-5, shift=1e-4))
    cases.append(_lsmr_case(*s["lsmr"], 1e3, dtype, 1e-7))
    cases.append(_unjitted_case(s["unjitted"], dtype))
    return cases
