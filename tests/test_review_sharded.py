"""Regression tests from a review of solves over many devices: the checks run on
8 simulated CPU devices in one subprocess (`tests/review_sharded_worker.py`,
started once per module), which reports its results as JSON."""

import pathlib

import pytest
from conftest import ADDED_XLA_FLAGS
from device_worker import run_worker, worker_result


HERE = pathlib.Path(__file__).parent
WORKER = HERE / "review_sharded_worker.py"
TIMEOUT = 600


@pytest.fixture(scope="module")
def results():
    return run_worker(WORKER, [], ADDED_XLA_FLAGS, 10, timeout=TIMEOUT)


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
@pytest.mark.parametrize("mode", ["jit", "eager"])
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
@pytest.mark.parametrize("solver", ["LU", "CG", "GMRES"])
def test_function_operator_inside_shard_map(results, solver, vma):
    """A `FunctionLinearOperator` built inside `jax.shard_map` (closing over each
    batch member's matrix), solved and differentiated: the one-device values and
    gradients. Before the fix: a trace-time error from the closure conversion."""
    c = worker_result(results, "shard-map-function")[f"{solver}-vma={vma}"]
    assert c["error"] == "none", c
    assert c["max_diff"] <= 1e-10


@pytest.mark.parametrize("vma", [True, False])
@pytest.mark.parametrize("jac", ["fwd", "bwd"])
@pytest.mark.parametrize("solver", ["CG", "GMRES"])
def test_jacobian_operator_inside_shard_map(results, solver, jac, vma):
    """A `JacobianLinearOperator` built inside `jax.shard_map` (`check_vma` either
    way), solved by a Krylov solver and differentiated: the one-device values and
    gradients. Before the fix: a trace-time error from the closure conversion
    (or, with `check_vma=True`, from a replayed cast to varying)."""
    c = worker_result(results, "shard-map-jacobian")[f"{solver}-{jac}-vma={vma}"]
    assert c["error"] == "none", c
    assert c["max_diff"] <= 1e-10
