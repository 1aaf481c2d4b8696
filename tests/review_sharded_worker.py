"""Checks of sharded solves found wanting by a review (see
`tests/test_review_sharded.py`), on 8 simulated CPU devices, in one subprocess
(the device count is fixed when JAX starts). Each check prints one line
`RESULT {json}` when it is done; those that may abort the process (a device left
waiting in a collective) run last.

Run it by hand with `PYTHONPATH=src python tests/review_sharded_worker.py [NAME...]`.
"""

import sys
from typing import Literal

from device_worker import configure_devices, DEVICES, emit, run


# (A device left waiting in a collective aborts the process after 10 s: see
# `configure_devices`.)
configure_devices(collective_timeout=10)


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


jax.config.update("jax_enable_x64", True)

import lineax as lx  # noqa: E402


def raised(f, *args):
    """`(True, message)` if `f(*args)` raises, else `(False, "")`."""
    try:
        jax.block_until_ready(f(*args))
    except Exception as e:
        return True, f"{type(e).__name__}: {e}"[-3000:]
    return False, ""


def check_shard_map_throw(mesh):
    """`throw=True` inside `jax.shard_map`, a batch of solves per device of which
    one member (on one device) fails, followed by a collective. Before the fix the
    failing device raised alone and the others waited in the `psum` until XLA
    aborted the process."""
    n, batch = 6, 16
    a = np.stack([2 * np.eye(n)] * batch)
    a[5] = 0  # on the third device
    b = np.ones((batch, n))
    sharding = NamedSharding(mesh, P("x"))
    a, b = jax.device_put(a, sharding), jax.device_put(b, sharding)
    out = {}
    for vma in (True, False):
        for name, solver, tags in (
            ("LU", lx.LU(), ()),
            ("CG", lx.CG(rtol=1e-12, atol=1e-12), lx.positive_semidefinite_tag),
        ):

            def one(a, b, solver=solver, tags=tags):
                op = lx.MatrixLinearOperator(a, tags)
                return lx.linear_solve(op, b, solver).value

            def local(a, b, one=one):
                x = jax.vmap(one)(a, b)
                return x, jax.lax.psum(jnp.sum(x), "x")

            f = jax.jit(
                jax.shard_map(
                    local,
                    mesh=mesh,
                    in_specs=P("x"),
                    out_specs=(P("x"), P()),
                    check_vma=vma,
                )
            )
            did_raise, message = raised(f, a, b)
            # The same solves succeed without the failing member.
            x, _ = f(a.at[5].set(2 * np.eye(n)), b)
            out[f"{name}-vma={vma}"] = {
                "raised": did_raise,
                "message": message,
                "ok_after": bool(np.allclose(np.asarray(x), 0.5)),
            }
    return out


def check_explicit_axes():
    """Arrays sharded over explicit mesh axes (`jax.make_mesh`'s default): JAX
    refuses the solvers' operations (a `ShardingTypeError` from inside lineax);
    lineax adds a note saying what to do, once. The advice works: the solve inside
    `jax.sharding.auto_axes` gives the single-device answer, sharded as asked."""
    n = 16
    a = 2.5 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
    b = np.linspace(1.0, 2.0, n)
    expected = np.linalg.solve(a, b)
    tags = lx.positive_semidefinite_tag
    solvers = {
        "LU": lx.LU(),
        "CG": lx.CG(rtol=1e-10, atol=1e-10),
        "GMRES": lx.GMRES(rtol=1e-10, atol=1e-10),
    }
    axis_type = jax.sharding.AxisType.Explicit
    mesh = jax.make_mesh((DEVICES,), ("x",), axis_types=(axis_type,))
    out = {}
    with jax.set_mesh(mesh):
        a = jax.device_put(a, P("x", None))
        b = jax.device_put(b, P("x"))
        for name, solver in solvers.items():

            def solve(a, b, solver=solver):
                op = lx.MatrixLinearOperator(a, tags)
                return lx.linear_solve(op, b, solver).value

            # ("eager-again": the second call, by the flat path of
            # `linear_solve`, whose cached entry the first call made.)
            modes = (("jit", jax.jit(solve)), ("eager", solve), ("eager-again", solve))
            for mode, f in modes:
                try:
                    f(a, b)
                    notes, kind = [], "none"
                except Exception as e:
                    notes, kind = getattr(e, "__notes__", []), type(e).__name__
                out[f"{name}-{mode}"] = {
                    "error": kind,
                    "notes": sum("auto_axes" in note for note in notes),
                }
            x = jax.jit(jax.sharding.auto_axes(solve, out_sharding=P("x")))(a, b)
            out[f"{name}-auto_axes"] = {
                "rel_err": float(np.max(np.abs(np.asarray(x) - expected))),
                "spec": str(tuple(x.sharding.spec)),
            }
    return out


def check_partial_shard_map():
    """Solves inside a `jax.shard_map` over one axis of a 2-D mesh
    (`axis_names={"a"}`, the other axis left to XLA). Before the fix every solve
    there failed to trace with a bare `AssertionError` from JAX (a struct typed as
    varying over "a" but with no sharding); now `throw=False` solves give the
    one-device values and codes (a singular member included) and `throw=True`,
    which needs a host callback that JAX refuses there, is a `ValueError` saying
    what to do."""
    mesh = jax.make_mesh(
        (4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2
    )
    batch, n = 8, 6
    a = np.stack([2 * np.eye(n) + 0.1 * i for i in range(batch)])
    a[5] = 0
    b = np.ones((batch, n))
    tags = lx.positive_semidefinite_tag
    sharding = NamedSharding(mesh, P("a"))
    a_sharded, b_sharded = jax.device_put(a, sharding), jax.device_put(b, sharding)
    out = {}
    for name, solver in (("LU", lx.LU()), ("CG", lx.CG(rtol=1e-10, atol=1e-10))):
        for throw in (False, True):

            def one(a, b, solver=solver, throw=throw):
                op = lx.MatrixLinearOperator(a, tags)
                sol = lx.linear_solve(op, b, solver, throw=throw)
                return sol.value, sol.result._value

            f = jax.shard_map(
                jax.vmap(one),
                mesh=mesh,
                in_specs=P("a"),
                out_specs=P("a"),
                axis_names={"a"},
            )
            try:
                x, codes = jax.jit(f)(a_sharded, b_sharded)
            except Exception as e:
                out[f"{name}-throw={throw}"] = {
                    "error": type(e).__name__,
                    "message": str(e)[:500],
                }
                continue
            x1, codes1 = jax.jit(jax.vmap(one))(a, b)
            x, x1 = np.nan_to_num(np.asarray(x)), np.nan_to_num(np.asarray(x1))
            out[f"{name}-throw={throw}"] = {
                "error": "none",
                "max_diff": float(np.max(np.abs(x - x1))),
                "codes": np.asarray(codes).tolist(),
                "codes_single": np.asarray(codes1).tolist(),
            }
    return out


def check_shard_map_function_operator(mesh, names):
    """A `FunctionLinearOperator` made inside `jax.shard_map` (a matrix-free
    operator per batch member, or one closed over per device), `check_vma` either
    way: the values and gradients of the same program on one device. Before the
    fix every such solve failed to trace ("Closure-converted function called with
    different dynamic arguments"; with `check_vma=True` and a Krylov solver, "pvary
    is a invariant->variant collective")."""
    n = 6
    a, b, a_sharded, b_sharded = _batch_of_spd_systems(mesh, n, seed=0)
    tags = lx.positive_semidefinite_tag
    solvers = {
        "LU": lx.LU(),
        "CG": lx.CG(rtol=1e-12, atol=1e-12),
        "GMRES": lx.GMRES(rtol=1e-12, atol=1e-12),
    }
    out = {}
    for name, solver in solvers.items():
        if names is not None and name not in names:
            continue

        def loss(a, b, solver=solver):
            struct = jax.ShapeDtypeStruct((n,), b.dtype)
            op = lx.FunctionLinearOperator(lambda v: a @ v, struct, tags)
            x = lx.linear_solve(op, b, solver).value
            return jnp.sum(x**2), x

        for vma, record in _against_one_device(
            _batched_value_and_grad(loss), mesh, (a_sharded, b_sharded), (a, b)
        ).items():
            out[f"{name}-vma={vma}"] = record
    return out


def _batch_of_spd_systems(mesh, n, seed):
    """16 SPD systems of size `n` (matrices and right-hand sides), in NumPy and
    split over `mesh`'s axis `x`."""
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((16, n, n))
    a = m @ m.transpose(0, 2, 1) + n * np.eye(n)
    b = rng.standard_normal((16, n))
    sharding = NamedSharding(mesh, P("x"))
    return a, b, jax.device_put(a, sharding), jax.device_put(b, sharding)


def _batched_value_and_grad(loss):
    """Each shard's solutions and gradients of `loss(a, b) -> (value, x)`, over
    its batch of `(a, b)`."""

    def local(a, b):
        (_, x), grads = jax.vmap(jax.value_and_grad(loss, (0, 1), has_aux=True))(a, b)
        return x, grads

    return local


def _against_one_device(local, mesh, sharded_args, args):
    """`local` run per device inside `jax.shard_map` (batch axis split over
    `mesh`'s axis `x`), with `check_vma` True and False, against the same function
    on one device (computed once for both: it does not depend on `check_vma`): by
    `check_vma`, the largest difference of their outputs, or the error."""
    expected = jax.jit(local)(*args)
    out = {}
    for vma in (True, False):
        try:
            got = jax.jit(
                jax.shard_map(
                    local, mesh=mesh, in_specs=P("x"), out_specs=P("x"), check_vma=vma
                )
            )(*sharded_args)
        except Exception as e:
            out[vma] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        diffs = jax.tree_util.tree_map(
            lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
            got,
            expected,
        )
        out[vma] = {"error": "none", "max_diff": max(jax.tree_util.tree_leaves(diffs))}
    return out


def check_shard_map_jacobian_operator(mesh, names):
    """A `JacobianLinearOperator` made inside `jax.shard_map` (per batch member,
    linearised at a constant point), `check_vma` either way, solved by Krylov
    solvers and differentiated: the one-device values and gradients. Before the
    fix: "Closure-converted function called with different dynamic arguments"
    (the operator's arrays entered the solve as values over no mesh, its function
    was converted at values over the manual one); with `check_vma=True`, "pvary
    is a invariant->variant collective" (the converted function replayed a cast
    recorded at the unvarying point), or JAX's VJP type check with `jac="bwd"`."""
    n = 6
    a, b, a_sharded, b_sharded = _batch_of_spd_systems(mesh, n, seed=1)
    tags = lx.positive_semidefinite_tag
    out = {}
    jacs: tuple[Literal["fwd", "bwd"], ...] = ("fwd", "bwd")
    cases: list[tuple[Literal["fwd", "bwd"], str, lx.AbstractLinearSolver]] = [
        (jac, name, solver)
        for jac in jacs
        for name, solver in (
            ("CG", lx.CG(rtol=1e-12, atol=1e-12)),
            ("GMRES", lx.GMRES(rtol=1e-12, atol=1e-12)),
        )
    ]
    for jac, name, solver in cases:
        if names is not None and f"{name}-{jac}" not in names:
            continue

        def loss(a, b, solver=solver, jac: Literal["fwd", "bwd"] = jac):
            op = lx.JacobianLinearOperator(
                lambda x, args: args @ x + 0.1 * x**2, jnp.ones(n), a, tags, jac
            )
            x = lx.linear_solve(op, b, solver).value
            return jnp.sum(x**2), x

        for vma, record in _against_one_device(
            _batched_value_and_grad(loss), mesh, (a_sharded, b_sharded), (a, b)
        ).items():
            out[f"{name}-{jac}-vma={vma}"] = record
    return out


def main():
    assert jax.device_count() == DEVICES, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("x",))
    # Arguments: the checks to run (all if none), and `--function=SOLVER,...` and
    # `--jacobian=SOLVER-JAC,...`, the cases of those two checks (all if not
    # given): each case compiles three solves under `vmap` of `grad`.
    options: dict[str, set[str] | None] = {"--function": None, "--jacobian": None}
    only = []
    for arg in sys.argv[1:]:
        key, _, value = arg.partition("=")
        if key in options:
            options[key] = set(value.split(","))
        else:
            only.append(arg)
    function, jacobian = options["--function"], options["--jacobian"]
    checks = {
        "explicit-axes": check_explicit_axes,
        "partial-shard-map": check_partial_shard_map,
        "shard-map-function": lambda: check_shard_map_function_operator(mesh, function),
        "shard-map-jacobian": lambda: check_shard_map_jacobian_operator(mesh, jacobian),
        # Last: before its fix, it aborts the process.
        "shard-map-throw": lambda: check_shard_map_throw(mesh),
    }
    for key, check in checks.items():
        if not only or key in only:
            run(key, check)
    emit("done")


if __name__ == "__main__":
    main()
