"""Regression tests from a review of solves over many devices: the checks run on
8 simulated CPU devices in one subprocess (`tests/review_sharded_worker.py`,
started once per module), which reports its results as JSON."""

import pathlib

import pytest
from conftest import ADDED_XLA_FLAGS, EXHAUSTIVE
from device_worker import run_worker, worker_result


HERE = pathlib.Path(__file__).parent
WORKER = HERE / "review_sharded_worker.py"
TIMEOUT = 600

# The operators built inside `shard_map` and differentiated: each case compiles
# `vmap` of `value_and_grad` three times (on one device, and sharded with
# `check_vma` True and False), about two thirds of the worker's time. The default
# run takes each solver and each `jac` once (the fix was in the closure
# conversion that every solver shares); the rest with LINEAX_EXHAUSTIVE=1.
FUNCTION_SOLVERS = ["LU", "CG", "GMRES"]
FUNCTION_DEFAULT = {"LU", "GMRES"}
JACOBIAN_CASES = [(s, j) for s in ("CG", "GMRES") for j in ("fwd", "bwd")]
JACOBIAN_DEFAULT = {("CG", "fwd"), ("GMRES", "bwd")}


def _exhaustive_unless(default: bool):
    return () if default else pytest.mark.exhaustive


@pytest.fixture(scope="module")
def results():
    args = []
    if not EXHAUSTIVE:
        args = [
            "--function=" + ",".join(sorted(FUNCTION_DEFAULT)),
            "--jacobian=" + ",".join(f"{s}-{j}" for s, j in sorted(JACOBIAN_DEFAULT)),
        ]
    return run_worker(WORKER, args, ADDED_XLA_FLAGS, 10, timeout=TIMEOUT)


@pytest.mark.parametrize("vma", [True, False])
@pytest.mark.parametrize("solver", ["LU", "CG"])
def test_shard_map_throw_raises_on_every_device(results, solver, vma):
    """`throw=True` inside `jax.shard_map` (`check_vma` either way), one solve of
    one device's batch failing, a `psum` after it: the error is raised (every
    device raises it, so none is left waiting in the `psum`), the process stays
    usable. Before the fix the process was aborted by XLA ("only 7 of 8
    arrived")."""
    c = worker_result(results, "shard-map-throw")[f"{solver}-vma={vma}"]
    assert c["raised"]
    assert "`linear_solve` failed" in c["message"]
    assert c["ok_after"]


@pytest.mark.parametrize("solver", ["LU", "CG", "GMRES"])
@pytest.mark.parametrize("mode", ["jit", "eager", "eager-again"])
def test_explicit_axes_error_says_what_to_do(results, solver, mode):
    """A solve of arrays sharded over explicit mesh axes fails in JAX's sharding
    type check, deep inside the solver; the error carries one note naming the
    remedy (`jax.sharding.auto_axes`, or auto axes). Before, it had none (and
    the docs said explicit shardings on every array would do)."""
    c = worker_result(results, "explicit-axes")[f"{solver}-{mode}"]
    assert c["error"] == "ShardingTypeError"
    assert c["notes"] == 1


@pytest.mark.parametrize("solver", ["LU", "CG", "GMRES"])
def test_explicit_axes_remedy_works(results, solver):
    c = worker_result(results, "explicit-axes")[f"{solver}-auto_axes"]
    assert c["rel_err"] <= 1e-9
    assert c["spec"] == "('x',)"


@pytest.mark.parametrize("solver", ["LU", "CG"])
def test_solves_inside_shard_map_over_some_axes(results, solver):
    """`throw=False` solves inside `jax.shard_map(..., axis_names={"a"})` on a
    2-D mesh: the one-device values and result codes (the singular member:
    `singular` for LU, a breakdown for CG). Before the fix: an `AssertionError`
    from JAX at trace time, for every solve."""
    c = worker_result(results, "partial-shard-map")[f"{solver}-throw=False"]
    assert c["error"] == "none", c
    assert c["max_diff"] <= 1e-12
    assert c["codes"] == c["codes_single"]
    assert c["codes"][5] != 0 and sum(c["codes"]) == c["codes"][5]


@pytest.mark.parametrize("solver", ["LU", "CG"])
def test_throw_inside_shard_map_over_some_axes_says_what_to_do(results, solver):
    c = worker_result(results, "partial-shard-map")[f"{solver}-throw=True"]
    assert c["error"] == "ValueError", c
    assert "throw=False" in c["message"]


@pytest.mark.parametrize("vma", [True, False])
@pytest.mark.parametrize(
    "solver",
    [
        pytest.param(s, marks=_exhaustive_unless(s in FUNCTION_DEFAULT))
        for s in FUNCTION_SOLVERS
    ],
)
def test_function_operator_inside_shard_map(results, solver, vma):
    """A `FunctionLinearOperator` built inside `jax.shard_map` (closing over each
    batch member's matrix), solved and differentiated: the one-device values and
    gradients. Before the fix: a trace-time error from the closure conversion."""
    c = worker_result(results, "shard-map-function")[f"{solver}-vma={vma}"]
    assert c["error"] == "none", c
    assert c["max_diff"] <= 1e-10


@pytest.mark.parametrize("vma", [True, False])
@pytest.mark.parametrize(
    "solver,jac",
    [
        pytest.param(s, j, marks=_exhaustive_unless((s, j) in JACOBIAN_DEFAULT))
        for s, j in JACOBIAN_CASES
    ],
)
def test_jacobian_operator_inside_shard_map(results, solver, jac, vma):
    """A `JacobianLinearOperator` built inside `jax.shard_map` (`check_vma` either
    way), solved by a Krylov solver and differentiated: the one-device values and
    gradients. Before the fix: a trace-time error from the closure conversion
    (or, with `check_vma=True`, from a replayed cast to varying)."""
    c = worker_result(results, "shard-map-jacobian")[f"{solver}-{jac}-vma={vma}"]
    assert c["error"] == "none", c
    assert c["max_diff"] <= 1e-10
