"""Checks of lineax on 8 simulated CPU devices, run by `tests/test_sharded.py` in one
subprocess (the device count is fixed when JAX starts, so it cannot be set inside
the test process). Each check prints one line `RESULT {json}` as soon as it is done,
so that the results before a crash still reach the test.

Run it by hand with `PYTHONPATH=src python tests/sharded_worker.py`.
"""

import sys
from typing import Any

from device_worker import configure_devices, DEVICES, emit, run


# (A device left waiting in a collective aborts the process after 15 s: see
# `configure_devices`.)
configure_devices(collective_timeout=15)


import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


jax.config.update("jax_enable_x64", True)

import lineax as lx  # noqa: E402
from lineax._errors import error_if_everywhere  # noqa: E402


ROWS_PER_DEVICE = 4
COLS = 32
ROWS = DEVICES * ROWS_PER_DEVICE  # a 32 x 32 grid, 4 rows per device
SIZE = ROWS * COLS
COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all")


#
# The problem: the 2-D Poisson equation (5-point stencil, Dirichlet boundary), its
# grid split into row blocks, one block per device.
#


def stencil(u, above, below):
    """`-Laplacian(u)` on a block of rows, given the rows just above and below it."""
    ext = jnp.concatenate([above[None], u, below[None]], axis=0)
    ext = jnp.pad(ext, ((0, 0), (1, 1)))
    return 4 * u - ext[:-2, 1:-1] - ext[2:, 1:-1] - ext[1:-1, :-2] - ext[1:-1, 2:]


def poisson_plain(x):
    """On the whole grid: XLA's partitioner inserts the communication."""
    u = x.reshape(ROWS, COLS)
    zero = jnp.zeros((COLS,), x.dtype)
    return stencil(u, zero, zero).reshape(-1)


def make_poisson_halo(mesh):
    """The halo exchange written by hand: `shard_map` and one `ppermute` per
    neighbour; the first and last device get zeros (the boundary)."""
    down = [(i, i + 1) for i in range(DEVICES - 1)]
    up = [(i + 1, i) for i in range(DEVICES - 1)]

    def local(x):
        u = x.reshape(-1, COLS)
        above = jax.lax.ppermute(u[-1], "x", down)
        below = jax.lax.ppermute(u[0], "x", up)
        return stencil(u, above, below).reshape(-1)

    return jax.shard_map(local, mesh=mesh, in_specs=P("x"), out_specs=P("x"))


def operator(mv, dtype):
    return lx.FunctionLinearOperator(
        mv, jax.ShapeDtypeStruct((SIZE,), dtype), lx.positive_semidefinite_tag
    )


def rhs(dtype):
    i = np.arange(SIZE)
    return jnp.asarray(1 + np.sin(0.1 * i) + 0.5 * np.cos(0.37 * i), dtype)


# float32: a tolerance it can reach on this grid (cond(A) ~ 400) with every solver.
TOL = {jnp.float32: 1e-3, jnp.float64: 1e-9}


def solvers(dtype):
    tol = TOL[dtype]
    return {
        "CG": lx.CG(rtol=tol, atol=tol),
        "PipelinedCG": lx.PipelinedCG(rtol=tol, atol=tol),
        "MINRES": lx.MINRES(rtol=tol, atol=tol),
        "GMRES": lx.GMRES(rtol=tol, atol=tol, restart=30),
        "BiCGStab": lx.BiCGStab(rtol=tol, atol=tol),
        "LSMR": lx.LSMR(rtol=tol, atol=tol),
    }


def rel_diff(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def spec(x):
    sharding = x.sharding
    if isinstance(sharding, NamedSharding):
        return str(tuple(sharding.spec))
    return "replicated" if sharding.is_fully_replicated else str(sharding)


def on_one_device(x):
    return jax.device_put(x, jax.devices()[0])


def collectives(compiled_text):
    return [
        line.strip()[:200]
        for line in compiled_text.splitlines()
        if any(f" {op}(" in line or f" {op}-start(" in line for op in COLLECTIVES)
    ]


#
# The checks.
#


_single_device = {}


def krylov_solve(name, dtype, mv, b):
    solver = solvers(dtype)[name]

    @jax.jit
    def f(b):
        sol = lx.linear_solve(operator(mv, dtype), b, solver, throw=False)
        return sol.value, sol.result._value, sol.stats["num_steps"]

    return f(b)


def make_krylov_check(mesh, name, dtype, mv_kind):
    def check():
        sharded_mv = make_poisson_halo(mesh) if mv_kind == "halo" else poisson_plain
        b = rhs(dtype)
        key = (name, dtype)
        if key not in _single_device:  # shared by both `mv`s
            _single_device[key] = krylov_solve(
                name, dtype, poisson_plain, on_one_device(b)
            )
        x1, r1, n1 = _single_device[key]
        sharding = NamedSharding(mesh, P("x"))
        xs, rs, ns = krylov_solve(name, dtype, sharded_mv, jax.device_put(b, sharding))
        return {
            "rel_diff": rel_diff(xs, x1),
            "steps_single": int(n1),
            "steps_sharded": int(ns),
            "result_single": int(r1),
            "result_sharded": int(rs),
            "spec": spec(xs),
            "dtype": np.dtype(dtype).name,
        }

    return check


def make_grad_check(mesh, dtype, throw):
    def check():
        tol = TOL[dtype]
        solver = lx.CG(rtol=tol, atol=tol)
        halo = make_poisson_halo(mesh)
        b = rhs(dtype)

        def loss(mv):
            def f(b):
                x = lx.linear_solve(operator(mv, dtype), b, solver, throw=throw).value
                return jnp.sum(x * x)

            return jax.jit(jax.grad(f))

        g1 = loss(poisson_plain)(on_one_device(b))
        gs = loss(halo)(jax.device_put(b, NamedSharding(mesh, P("x"))))
        return {
            "rel_diff": rel_diff(gs, g1),
            "finite": bool(np.all(np.isfinite(np.asarray(gs)))),
            "spec": spec(gs),
        }

    return check


def make_throw_true_sharding_check(mesh, name):
    """`throw=True` (the default) must keep the solution's sharding too."""

    def check():
        dtype = jnp.float64
        solver = solvers(dtype)[name]
        f = jax.jit(
            lambda b: (
                lx.linear_solve(
                    operator(make_poisson_halo(mesh), dtype), b, solver
                ).value
            )
        )
        x = f(jax.device_put(rhs(dtype), NamedSharding(mesh, P("x"))))
        return {"spec": spec(x)}

    return check


BATCH = 16
N_SMALL = 6


def make_batched_direct_check(mesh, name):
    def check():
        solver, tags = {
            "LU": (lx.LU(), ()),
            "Cholesky": (lx.Cholesky(), lx.positive_semidefinite_tag),
            "QR": (lx.QR(), ()),
        }[name]
        rng = np.random.default_rng(0)
        m = rng.standard_normal((BATCH, N_SMALL, N_SMALL))
        a = jnp.asarray(m @ m.transpose(0, 2, 1) + N_SMALL * np.eye(N_SMALL))
        b = jnp.asarray(rng.standard_normal((BATCH, N_SMALL)))

        def one(a, b):
            op = lx.MatrixLinearOperator(a, tags)
            return lx.linear_solve(op, b, solver, throw=False).value

        f = jax.jit(jax.vmap(one))
        x1 = f(on_one_device(a), on_one_device(b))
        a_s = jax.device_put(a, NamedSharding(mesh, P("x", None, None)))
        b_s = jax.device_put(b, NamedSharding(mesh, P("x", None)))
        xs = f(a_s, b_s)
        hlo = f.lower(a_s, b_s).compile().as_text()
        reference = np.linalg.solve(np.asarray(a), np.asarray(b)[..., None])[..., 0]
        return {
            "rel_diff": rel_diff(xs, x1),
            "rel_err_numpy": rel_diff(xs, reference),
            "spec": spec(xs),
            "collectives": collectives(hlo),
        }

    return check


def make_shard_map_check(mesh):
    """Batched solves inside `jax.shard_map` with `check_vma=True` (its
    default), which types each value by the mesh axes it varies over: the operator
    sharded or closed over, `throw=True` and `throw=False` (with one singular
    matrix, so that the inputs are examined). Compared with the same program on
    one device: the values to rounding, the result codes exactly."""

    def check():
        rng = np.random.default_rng(1)
        m = rng.standard_normal((BATCH, N_SMALL, N_SMALL))
        a = m @ m.transpose(0, 2, 1) + N_SMALL * np.eye(N_SMALL)
        singular = a.copy()
        singular[3] = 0
        a, singular = jnp.asarray(a), jnp.asarray(singular)
        closed = a[0]
        b = jnp.asarray(rng.standard_normal((BATCH, N_SMALL)))

        def solve(a, b, solver, throw):
            op = lx.MatrixLinearOperator(a, lx.positive_semidefinite_tag)
            sol = lx.linear_solve(op, b, solver, throw=throw)
            return sol.value, sol.result._value

        def cases(a, singular, b):
            # One program for all, compiled once on one device and once sharded.
            # Every case for LU; one or two with `throw=False` (whose inputs are
            # examined in a `lax.cond`) for each other solver, to keep the compile
            # short. The Krylov solvers (whose loops start from constants) on
            # regular matrices: at a singular one they stop where rounding makes
            # them.
            on_closed = jax.vmap(
                lambda b, s, t: solve(closed, b, s, t), (0, None, None)
            )
            on_sharded = jax.vmap(solve, (0, 0, None, None))
            tol: dict[str, Any] = dict(rtol=1e-12, atol=1e-12)
            return {
                "LU-sharded": on_sharded(a, b, lx.LU(), True),
                "LU-closed": on_closed(b, lx.LU(), True),
                "LU-sharded-throw-false": on_sharded(singular, b, lx.LU(), False),
                "LU-closed-throw-false": on_closed(b, lx.LU(), False),
                "QR-sharded-throw-false": on_sharded(singular, b, lx.QR(), False),
                "Cholesky-sharded-throw-false": on_sharded(
                    singular, b, lx.Cholesky(), False
                ),
                "SVD-sharded-throw-false": on_sharded(singular, b, lx.SVD(), False),
                "Auto-closed-throw-false": on_closed(
                    b, lx.AutoLinearSolver(well_posed=True), False
                ),
                "CG-sharded-throw-false": on_sharded(a, b, lx.CG(**tol), False),
                "GMRES-closed-throw-false": on_closed(b, lx.GMRES(**tol), False),
            }

        expected = jax.jit(cases)(a, singular, b)
        sharded = jax.shard_map(cases, mesh=mesh, in_specs=P("x"), out_specs=P("x"))
        got = jax.jit(sharded)(a, singular, b)
        return {
            case: {
                "rel_diff": rel_diff(
                    np.nan_to_num(got[case][0]), np.nan_to_num(expected[case][0])
                ),
                "nan_equal": bool(
                    np.array_equal(np.isnan(got[case][0]), np.isnan(expected[case][0]))
                ),
                "codes": np.asarray(got[case][1]).tolist(),
                "codes_equal": bool(np.array_equal(got[case][1], expected[case][1])),
            }
            for case in expected
        }

    return check


def make_matrix_check(mesh, name):
    def check():
        n = 64
        dtype = jnp.float64
        a = 2.5 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
        b = rhs(dtype)[:n]
        op_tags = lx.positive_semidefinite_tag
        solver = {
            "CG": lx.CG(rtol=1e-10, atol=1e-10),
            "GMRES": lx.GMRES(rtol=1e-10, atol=1e-10),
        }[name]

        def f(a, b):
            op = lx.MatrixLinearOperator(a, op_tags)
            sol = lx.linear_solve(op, b, solver, throw=False)
            return sol.value, sol.stats["num_steps"]

        f = jax.jit(f)
        x1, n1 = f(on_one_device(jnp.asarray(a)), on_one_device(b))
        a_s = jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("x", None)))
        xs, ns = f(a_s, jax.device_put(b, NamedSharding(mesh, P("x"))))
        return {
            "rel_diff": rel_diff(xs, x1),
            "rel_err_numpy": rel_diff(xs, np.linalg.solve(a, np.asarray(b))),
            "steps_single": int(n1),
            "steps_sharded": int(ns),
            "spec": spec(xs),
        }

    return check


def poisson_sparse():
    """The matrix of `poisson_plain`, as a `jax.experimental.sparse.BCSR`."""
    import scipy.sparse
    from jax.experimental import sparse as jsparse

    # (Sparse factors: with two NumPy arrays, newer SciPy warns about the type
    # `kron` returns.)
    def second_difference(n):
        return scipy.sparse.csr_array(2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1))

    def eye(n):
        return scipy.sparse.csr_array(np.eye(n))

    kron = scipy.sparse.kron
    matrix = kron(second_difference(ROWS), eye(COLS)) + kron(
        eye(ROWS), second_difference(COLS)
    )
    return jsparse.BCSR.from_scipy_sparse(matrix.tocsr())


def make_sparse_check(mesh):
    """CG with a `SparseLinearOperator` on a sharded vector, built outside `jit`
    (its diagonal layout) and under `jit` from the matrix (gather + segment sum),
    against the first on one device."""

    def check():
        solver = lx.CG(rtol=1e-10, atol=1e-10)
        tags = lx.positive_semidefinite_tag
        matrix = poisson_sparse()
        op = lx.SparseLinearOperator(matrix, tags)
        assert op._offsets == (-COLS, -1, 0, 1, COLS), op._offsets

        def solve(op, b):
            sol = lx.linear_solve(op, b, solver, throw=False)
            return sol.value, sol.result._value, sol.stats["num_steps"]

        diagonals = jax.jit(solve)
        segment_sum = jax.jit(lambda m, b: solve(lx.SparseLinearOperator(m, tags), b))
        b = rhs(jnp.float64)
        b_sharded = jax.device_put(b, NamedSharding(mesh, P("x")))
        x1, r1, n1 = diagonals(op, on_one_device(b))
        dense = np.asarray(matrix.todense())
        out = {
            "steps_single": int(n1),
            "result_single": int(r1),
            "rel_err_numpy": rel_diff(x1, np.linalg.solve(dense, np.asarray(b))),
        }
        for name, (xs, rs, ns) in (
            ("diagonals", diagonals(op, b_sharded)),
            ("segment-sum", segment_sum(matrix, b_sharded)),
        ):
            out[name] = {
                "rel_diff": rel_diff(xs, x1),
                "steps_sharded": int(ns),
                "result_sharded": int(rs),
                "spec": spec(xs),
            }
        return out

    return check


def failing_solve(mesh, throw):
    """CG with too few steps: `max_steps_reached`."""
    dtype = jnp.float64
    solver = lx.CG(rtol=1e-10, atol=1e-10, max_steps=3)

    def f(b):
        sol = lx.linear_solve(
            operator(make_poisson_halo(mesh), dtype), b, solver, throw=throw
        )
        return sol.value, sol.result._value

    return jax.jit(f), jax.device_put(rhs(dtype), NamedSharding(mesh, P("x")))


def make_throw_false_check(mesh):
    def check():
        f, b = failing_solve(mesh, throw=False)
        x, code = f(b)
        single = lx.linear_solve(
            operator(poisson_plain, jnp.float64),
            on_one_device(rhs(jnp.float64)),
            lx.CG(rtol=1e-10, atol=1e-10, max_steps=3),
            throw=False,
        )
        return {
            "code": int(code),
            "code_single": int(single.result._value),
            "expected": int(lx.RESULTS.max_steps_reached._value),
            "code_replicated": bool(code.sharding.is_fully_replicated),
            "spec": spec(x),
        }

    return check


def recovers_after(mesh, raising):
    """Whether `raising()` raises, and a normal sharded solve works afterwards."""
    try:
        jax.block_until_ready(raising())
        raised, message = False, ""
    except Exception as e:
        raised, message = True, f"{type(e).__name__}: {e}"[:3000]
    x = jax.jit(
        lambda b: (
            lx.linear_solve(
                operator(make_poisson_halo(mesh), jnp.float64),
                b,
                lx.CG(rtol=1e-8, atol=1e-8),
                throw=False,
            ).value
        )
    )(jax.device_put(rhs(jnp.float64), NamedSharding(mesh, P("x"))))
    residual = rel_diff(poisson_plain(on_one_device(x)), rhs(jnp.float64))
    return {"raised": raised, "message": message, "after_residual": residual}


def make_error_helper_check(mesh):
    """`error_if_everywhere` (the proposed `throw=True` mechanism) on its own."""

    def check():
        @jax.jit
        def f(x):
            index = jnp.asarray(1)
            y = error_if_everywhere(x, jnp.sum(x) > 0, index, ["", "boom everywhere"])
            return 2 * y

        x = jax.device_put(jnp.arange(64.0), NamedSharding(mesh, P("x")))
        out = recovers_after(mesh, lambda: f(x))
        out["spec_ok_path"] = spec(f(-x))
        try:
            eqx.filter_jit(f)(x)
            out["filter_jit_type"] = "none"
        except Exception as e:
            out["filter_jit_type"] = type(e).__name__
        return out

    return check


def make_throw_true_check(mesh):
    def check():
        f, b = failing_solve(mesh, throw=True)
        return recovers_after(mesh, lambda: f(b))

    return check


def main():
    assert jax.device_count() == DEVICES, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("x",))
    # Arguments: key prefixes of the checks to run (all if none),
    # `--krylov=KEY,...`, the Krylov checks among them (all if not given), and
    # `--skip=KEY,...`, checks not to run.
    options = ("--krylov=", "--skip=")
    only = [arg for arg in sys.argv[1:] if not arg.startswith(options)]
    krylov = [arg for arg in sys.argv[1:] if arg.startswith("--krylov=")]
    krylov = set(krylov[-1].split("=", 1)[1].split(",")) if krylov else None
    skip = [arg for arg in sys.argv[1:] if arg.startswith("--skip=")]
    skip = set(skip[-1].split("=", 1)[1].split(",")) if skip else set()
    checks = {}
    for dtype in (jnp.float64, jnp.float32):
        for name in solvers(dtype):
            # The XLA-partitioned `mv` does not depend on the dtype: float64 only.
            for mv_kind in ("halo", "xla") if dtype == jnp.float64 else ("halo",):
                key = f"krylov-{name}-{np.dtype(dtype).name}-{mv_kind}"
                if krylov is None or key in krylov:
                    checks[key] = make_krylov_check(mesh, name, dtype, mv_kind)
    for dtype in (jnp.float64, jnp.float32):
        checks[f"grad-CG-{np.dtype(dtype).name}"] = make_grad_check(mesh, dtype, False)
    checks["grad-CG-float64-throw"] = make_grad_check(mesh, jnp.float64, True)
    for name in ("CG", "GMRES"):
        checks[f"throw-true-sharding-{name}"] = make_throw_true_sharding_check(
            mesh, name
        )
    for name in ("LU", "Cholesky", "QR"):
        checks[f"batched-{name}"] = make_batched_direct_check(mesh, name)
    for name in ("CG", "GMRES"):
        checks[f"matrix-{name}"] = make_matrix_check(mesh, name)
    checks["shard-map"] = make_shard_map_check(mesh)
    checks["sparse-CG"] = make_sparse_check(mesh)
    checks["throw-false"] = make_throw_false_check(mesh)
    checks["error-helper"] = make_error_helper_check(mesh)
    # Last: before the fix proposed in `lineax._errors`, this one aborts the process.
    checks["throw-true"] = make_throw_true_check(mesh)
    for key, check in checks.items():
        if key in skip:
            continue
        if not only or any(key.startswith(prefix) for prefix in only):
            run(key, check)
    emit("done")


if __name__ == "__main__":
    main()
