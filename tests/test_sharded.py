"""lineax on 8 simulated CPU devices: Krylov solves of a 2-D Poisson problem sharded
over a 1-D mesh (halo exchange by `shard_map` + `ppermute`, and left to XLA's
partitioner), `jax.grad` through a sharded solve, batched direct solves over a
sharded batch, a row-sharded matrix, errors under `throw`, and per-device solves
inside `shard_map` (with its type check of the mesh axes each value varies over).

The device count is fixed when JAX starts, so every check runs in one subprocess
(`tests/sharded_worker.py`, started once per test session) that reports its results
as JSON; the tests here assert on them.
"""

import pathlib

import pytest
from conftest import ADDED_XLA_FLAGS, EXHAUSTIVE
from device_worker import run_worker, worker_result
from helpers import sample


HERE = pathlib.Path(__file__).parent
WORKER = HERE / "sharded_worker.py"
TIMEOUT = 600

# float64 CG, PipelinedCG, MINRES, GMRES and LSMR make the same iterations on 8
# devices as on one, to rounding. BiCGStab (whose short recurrences amplify
# rounding) and float32 runs may stop a few steps apart, with answers within the
# tolerance.
EXACT = {"CG", "PipelinedCG", "MINRES", "GMRES", "LSMR"}
TOL = {"float64": 1e-9, "float32": 1e-3}
# Each solver in one of the three variants (float64 with the halo exchange or the
# XLA-partitioned product, float32 with the halo exchange), each variant for two
# solvers: fixed-seed slices, all 18 with LINEAX_EXHAUSTIVE=1. Each compiles a
# sharded and a single-device solve.
_VARIANTS = [("float64", "halo"), ("float64", "xla"), ("float32", "halo")]
KRYLOV = [
    (name, dtype, mv)
    for i, name in enumerate(
        ("CG", "PipelinedCG", "MINRES", "GMRES", "BiCGStab", "LSMR")
    )
    for dtype, mv in sample(_VARIANTS, i % 3, 3)
]
SHARDED = "('x',)"
# `jax.grad` through a sharded CG solve, each a sharded and a single-device
# compile: float64 with `throw=True` and float32 with `throw=False` cover both
# dtypes and both `throw`s; float64 with `throw=False` with LINEAX_EXHAUSTIVE=1.
SKIPPED = [] if EXHAUSTIVE else ["grad-CG-float64"]


@pytest.fixture(scope="module")
def results():
    krylov = ",".join(f"krylov-{name}-{dtype}-{mv}" for name, dtype, mv in KRYLOV)
    args = [f"--krylov={krylov}", f"--skip={','.join(SKIPPED)}"]
    return run_worker(WORKER, args, ADDED_XLA_FLAGS, 15, timeout=TIMEOUT)


@pytest.mark.parametrize("name,dtype,mv", KRYLOV)
def test_sharded_krylov_matches_one_device(results, name, dtype, mv):
    r = worker_result(results, f"krylov-{name}-{dtype}-{mv}")
    assert r["result_sharded"] == r["result_single"] == 0
    assert r["spec"] == SHARDED  # the solution keeps the right-hand side's sharding
    if dtype == "float64" and name in EXACT:
        assert r["steps_sharded"] == r["steps_single"]
        assert r["rel_diff"] <= 1e-11
    else:
        allowed = max(2, r["steps_single"] // 10)
        assert abs(r["steps_sharded"] - r["steps_single"]) <= allowed
        assert r["rel_diff"] <= 10 * TOL[dtype]


@pytest.mark.parametrize(
    "dtype", [pytest.param("float64", marks=pytest.mark.exhaustive), "float32"]
)
def test_grad_through_sharded_cg(results, dtype):
    r = worker_result(results, f"grad-CG-{dtype}")
    assert r["finite"]
    assert r["rel_diff"] <= (1e-10 if dtype == "float64" else 1e-2)
    assert r["spec"] == SHARDED


def test_grad_through_sharded_cg_throw(results):
    r = worker_result(results, "grad-CG-float64-throw")
    assert r["finite"]
    assert r["rel_diff"] <= 1e-10


def test_grad_through_sharded_cg_throw_keeps_sharding(results):
    assert worker_result(results, "grad-CG-float64-throw")["spec"] == SHARDED


@pytest.mark.parametrize("name", ["CG", "GMRES"])
def test_throw_true_keeps_sharding(results, name):
    assert worker_result(results, f"throw-true-sharding-{name}")["spec"] == SHARDED


@pytest.mark.parametrize("name", ["LU", "Cholesky", "QR"])
def test_batched_direct_solve_has_no_cross_device_traffic(results, name):
    r = worker_result(results, f"batched-{name}")
    assert r["collectives"] == []
    assert r["rel_diff"] <= 1e-14
    assert r["rel_err_numpy"] <= 1e-12
    assert r["spec"].startswith("('x'")


@pytest.mark.parametrize("name", ["CG", "GMRES"])
def test_row_sharded_matrix(results, name):
    r = worker_result(results, f"matrix-{name}")
    assert r["rel_diff"] <= 1e-12
    assert r["rel_err_numpy"] <= 1e-8
    assert r["steps_sharded"] == r["steps_single"]
    assert r["spec"] == SHARDED


@pytest.mark.parametrize("layout", ["diagonals", "segment-sum"])
def test_sharded_sparse_cg(results, layout):
    """CG with a `SparseLinearOperator` (diagonal layout, or the segment sum of
    one built under `jit`) on a sharded vector: the single-device answer, and the
    solution keeps the right-hand side's sharding."""
    r = worker_result(results, "sparse-CG")
    assert r["result_single"] == r[layout]["result_sharded"] == 0
    assert r[layout]["steps_sharded"] == r["steps_single"]
    assert r[layout]["rel_diff"] <= 1e-11
    assert r["rel_err_numpy"] <= 1e-8
    assert r[layout]["spec"] == SHARDED


def test_throw_false_result_codes_are_consistent(results):
    r = worker_result(results, "throw-false")
    assert r["code"] == r["code_single"] == r["expected"]
    assert r["code_replicated"]
    assert r["spec"] == SHARDED


def test_error_if_everywhere_raises_and_releases_devices(results):
    r = worker_result(results, "error-helper")
    assert r["raised"], r
    assert "boom everywhere" in r["message"]
    assert r["after_residual"] <= 1e-6
    assert r["spec_ok_path"] == SHARDED
    assert r["filter_jit_type"] == "EquinoxRuntimeError"


def test_throw_true_failure_raises_and_process_stays_usable(results):
    r = worker_result(results, "throw-true")
    assert r["raised"]
    assert "max" in r["message"].lower()
    assert r["after_residual"] <= 1e-6


def test_solves_inside_shard_map(results):
    """`linear_solve` inside `jax.shard_map` with `check_vma=True`: LU, QR,
    Cholesky, SVD, Auto, CG and GMRES with a sharded or a closed-over operator
    give the one-device values (SVD, CG and GMRES to rounding: their batches
    differ) and result codes. (lineax 0.1.1 fails to trace every one of them.)"""
    r = worker_result(results, "shard-map")
    for case, c in r.items():
        if case == "seconds":
            continue
        krylov = case.startswith(("CG", "GMRES"))
        assert c["rel_diff"] <= (1e-13 if krylov else 1e-15), case
        assert c["nan_equal"] and c["codes_equal"], case
        # The singular member (of the direct solves): singular for every solver
        # but SVD (a least-squares solution).
        if case.endswith("sharded-throw-false") and not krylov:
            assert c["codes"][3] == (0 if case.startswith("SVD") else 2), case
