"""Krylov solves terminate and never return worse than they started, on every
input: zero, tiny, huge and NaN right-hand sides, unreachable tolerances, singular
consistent and inconsistent systems, and the float32 problems where the requested
tolerance is below what the dtype can reach.

The solves run in a subprocess with a timeout (`krylov_worker.py`): a hang under
`jit` cannot be interrupted.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import lineax as lx


_HERE = os.path.dirname(__file__)
_SUCCESS = 0
_MAX_STEPS = int(lx.RESULTS.max_steps_reached._value)
_SINGULAR = int(lx.RESULTS.singular._value)
_BREAKDOWN = int(lx.RESULTS.breakdown._value)
_STAGNATION = int(lx.RESULTS.stagnation._value)
_NONFINITE = int(lx.RESULTS.nonfinite_input._value)
# Operator products per step, and the bound on verification products.
_MV_PER_STEP = {"CG": 1, "MINRES": 1, "GMRES": 1, "BiCGStab": 2, "LSMR": 2}
# Products made before the first step (to estimate the operator's scale; LSMR's
# first `A^H u`, which it uses for that too).
_UPFRONT_MV = {"MINRES": 1, "GMRES": 1, "BiCGStab": 1, "LSMR": 1}


def _run(*groups: str) -> dict[str, dict[str, dict]]:
    """Run the worker's `groups` in one process: each group's records by name."""
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(_HERE), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.join(_HERE, "krylov_worker.py"), *groups],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {}
    records = None
    for line in proc.stdout.splitlines():
        record = json.loads(line)
        if "group" in record:
            records = out[record["group"]] = {}
        else:
            assert records is not None, line  # a record before its group
            records[record["name"]] = record
    assert list(out) == list(groups), (list(out), proc.stderr[-3000:])
    return out


@pytest.fixture(scope="module")
def _groups():
    # One worker process for the file (a JAX import each, not five); the five
    # groups take under a minute together, well within the 600 s timeout.
    return _run("edge", "table", "stagnation", "scaled", "breakdown")


@pytest.fixture(scope="module")
def edge(_groups):
    return _groups["edge"]


@pytest.fixture(scope="module")
def table(_groups):
    return _groups["table"]


@pytest.mark.parametrize("name", list(_MV_PER_STEP))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_edge_inputs_terminate_and_never_diverge(edge, name, dtype):
    cases = {
        k.split("-", 2)[2]: v
        for k, v in edge.items()
        if k.startswith(f"{name}-{dtype}-")
    }
    assert len(cases) == 10
    n = 12
    eps = np.finfo(dtype).eps
    for case, c in cases.items():
        assert c["steps"] <= c["max_steps"], case
        # Operator products: the steps, plus at most one verification per step.
        per_step = _MV_PER_STEP[name]
        assert c["num_mv"] <= (2 * per_step) * c["max_steps"] + 2, case
        if case in ("nan", "inf"):
            # (An inf once gave x = 0, "successful": `inf <= inf` passed the
            # first convergence test.)
            assert c["code"] == _NONFINITE, case
            continue
        assert c["finite"], case
        # Never worse than the initial guess (zero).
        assert c["rnorm"] <= c["bnorm"] * (1 + 1e-3) + 1e-300, case
        if c["code"] == _SUCCESS and not (name == "LSMR" and "inconsistent" in case):
            # Success means the true residual meets the tolerance (up to the
            # rounding of the solution to the working precision).
            slack = 2 * c["rtol"] * c["bmax"] + 100 * n * eps * c["bmax"]
            assert c["rmax"] <= slack, (case, c)
    assert cases["zero"]["code"] == _SUCCESS and cases["zero"]["steps"] == 0
    # No product but those made before the first step (see `Problem.op_inverse`;
    # LSMR's `A^H u` was made but not counted).
    assert cases["zero"]["num_mv"] == _UPFRONT_MV.get(name, 0)
    for case in ("plain", "pow2", "tiny", "huge", "singular_consistent"):
        assert cases[case]["code"] == _SUCCESS, case
    # Scaling by a power of two changes nothing; by 1e+-30 at most a rounding.
    assert cases["pow2"]["steps"] == cases["plain"]["steps"]
    assert cases["pow2"]["num_mv"] == cases["plain"]["num_mv"]
    for case in ("tiny", "huge"):
        assert abs(cases[case]["steps"] - cases["plain"]["steps"]) <= 2, case
    assert cases["unreachable"]["code"] in (_MAX_STEPS, _STAGNATION, _BREAKDOWN)
    if name != "LSMR":
        # An inconsistent system has no solution: never `successful`.
        assert cases["singular_inconsistent"]["code"] != _SUCCESS
    # The residual history has one entry per step (zero after the last).
    assert cases["plain"]["history_recorded"] == cases["plain"]["steps"]


def test_cg_float32_poisson_below_floor_stagnates(table):
    c = table["cg_poisson_f32"]
    assert c["code"] == _STAGNATION
    assert c["finite"] and c["rnorm"] <= 1e-5 * c["bnorm"]
    assert c["steps"] < 3000


def test_cg_float32_laplacian_1d_converges(table):
    c = table["cg_laplace1d_f32"]
    assert c["code"] == _SUCCESS
    assert c["finite"] and c["rmax"] <= 2e-4 + 1e-4 * c["bmax"] + 1e-3


@pytest.mark.parametrize("dtype,bound", [("float32", 1e-5), ("float64", 1e-13)])
def test_fixed_iteration_solve_runs_max_steps(table, dtype, bound):
    # rtol = atol = 0 with max_steps: exactly max_steps steps, successful, and an
    # accurate iterate (not the divergence of a replaced residual).
    c = table[f"cg_fixed_{dtype}"]
    assert c["code"] == _SUCCESS
    assert c["steps"] == c["max_steps"] == 100
    assert c["rnorm"] <= bound * c["bnorm"]


def test_minres_float32_indefinite_terminates(table):
    c = table["minres_indefinite_f32"]
    assert c["code"] in (_SUCCESS, _STAGNATION)
    assert c["rnorm"] <= 1e-3 * c["bnorm"]
    assert c["steps"] < c["max_steps"]


def test_lsmr_float32_unreachable_tolerance_terminates(table):
    c = table["lsmr_tall_f32"]
    # rtol 1e-7 is below what float32 reaches at cond 1e3: stagnation, or success
    # at the level it does reach (`10 eps cond(A)` with LSMR's estimate of cond(A),
    # at most the true cond(A) = 1e3; ||A||_2 = 1 here). Never success above it.
    assert c["code"] in (_SUCCESS, _STAGNATION)
    if c["code"] == _SUCCESS:
        assert c["normal"] <= 10 * 1.2e-7 * 1e3
    assert c["rnorm"] <= (1 + 1e-4) * c["rnorm_lsq"]


def test_minres_singular_inconsistent_stops_at_least_squares(table):
    c = table["minres_neumann_f64"]
    assert c["code"] == _SINGULAR
    assert c["rnorm"] <= (1 + 1e-6) * c["rnorm_lsq"]
    assert c["steps"] < 200


@pytest.mark.parametrize("name", ["bicgstab", "gmres"])
def test_float32_convection_diffusion_below_floor_stagnates(table, name):
    c = table[f"{name}_convdiff_f32"]
    assert c["code"] == _STAGNATION
    assert c["rnorm"] <= 1e-6 * c["bnorm"]
    assert c["steps"] < c["max_steps"] // 4


def test_lsmr_gradient_keeps_preconditioner(table):
    c = table["lsmr_precond_grad"]
    assert c["steps"] < 60
    assert c["grad_error"] < 1e-6


@pytest.fixture(scope="module")
def stagnation(_groups):
    return _groups["stagnation"]


@pytest.mark.parametrize("rhs", ["ones", "sin", "randn"])
def test_cg_float32_poisson_40_no_breakdown(stagnation, rhs):
    # 2-D Poisson n = 1600, float32, rtol = atol = 1e-6: converges or stagnates at
    # the float32 floor (about eps * cond = 1e-4), never `breakdown` with a
    # diverged iterate (the old code returned a residual of 1e18).
    c = stagnation[f"cg_poisson40_f32_{rhs}"]
    assert c["code"] in (_SUCCESS, _STAGNATION)
    assert c["finite"] and c["rmax"] <= 1e-3 * c["bmax"]
    assert c["steps"] < 1000


@pytest.mark.parametrize("rhs", ["ones", "sin", "randn"])
def test_cg_float32_stagnation_is_prompt(stagnation, rhs):
    # The same problems: the floor is reached after 30-110 steps. The old rule (20
    # replacements without a new best) took 460-610 steps, as the true residual
    # at the floor fluctuates and sets a new best by chance now and then; a pass
    # whose recursive residual ends 4x below the true one now counts as at the
    # floor, and three of them without the true residual halving stop the solve.
    c = stagnation[f"cg_poisson40_f32_{rhs}"]
    assert c["steps"] < 200


def test_minres_float32_stagnation_is_prompt(stagnation):
    # The floor is reached after about 300 steps; the old rule (20 verifications
    # without a new best, verifying only when the estimate passed a tightening
    # threshold) took 2200.
    c = stagnation["minres_indefinite_maxnorm_f32"]
    assert c["code"] in (_SUCCESS, _STAGNATION)
    assert c["rnorm"] <= 1e-3 * c["bnorm"]
    assert c["steps"] < 600


def test_lsmr_float32_stagnation_is_prompt(stagnation):
    # Normal equations to rtol 1e-7 in float32 at cond 1e3: below the floor. The
    # old rule took 6100 steps; the estimate of ||A^H r|| falling while the true
    # one does not now stops it.
    c = stagnation["lsmr_tall_f32_1000x200"]
    # (Or success: the true normal-equations test passes at the level float32 can
    # reach, `10 eps cond(A)` with LSMR's estimate of cond(A); see `LSMR`.)
    assert c["code"] in (_STAGNATION, _SUCCESS)
    assert c["rnorm"] <= (1 + 1e-4) * c["rnorm_lsq"]
    assert c["steps"] < 2500


_SCALED_SOLVERS = [*_MV_PER_STEP, "FGMRES", "FlexibleCG", "PipelinedCG"]


@pytest.mark.parametrize("name", _SCALED_SOLVERS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_operator_scale_changes_nothing(_groups, name, dtype):
    # A x = b and (f A) x' = b, f = 2^k or 1e+-20 (float32), 1e+-200 (float64):
    # x' = x / f, with the same steps. GMRES, FGMRES, MINRES and LSMR failed
    # after 0-2 steps (the squares of `||A v||` in their in-loop norms overflowed
    # or underflowed), BiCGStab took 2-6x the steps (its `<t, t>` overflowed).
    cases = _groups["scaled"]
    one = cases[f"{name}-{dtype}-one"]
    tol = 1e-5 if dtype == "float32" else 1e-10
    for case in ("one", "pow2", "big", "small"):
        c = cases[f"{name}-{dtype}-{case}"]
        assert c["code"] == _SUCCESS, (case, c)
        assert c["error"] <= 100 * tol, (case, c)
        assert abs(c["steps"] - one["steps"]) <= 1, (case, c, one)
    # A power of two changes no bit of the iteration.
    assert cases[f"{name}-{dtype}-pow2"]["x"] == one["x"]
    assert cases[f"{name}-{dtype}-pow2"]["steps"] == one["steps"]


@pytest.mark.parametrize("name", ["MINRES", "GMRES", "BiCGStab", "LSMR", "FGMRES"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tiny_operator_with_a_huge_solution(_groups, name, dtype):
    # f = 2^-118 (float32), 1e-300 (float64): the solution is near the largest
    # float. The methods that scale the operator scale such a one up, and lift
    # the right-hand side with it; the iterate, multiplied back by the operator's
    # scale before the right-hand side's, overflowed: GMRES, FGMRES and BiCGStab
    # returned inf, reported singular. (CG and its variants do not scale the
    # operator: their products fall below the smallest normal float, flushed to
    # zero on CPU, and they report a breakdown.)
    c = _groups["scaled"][f"{name}-{dtype}-tiny"]
    tol = 1e-5 if dtype == "float32" else 1e-10
    assert c["code"] == _SUCCESS, c
    assert c["error"] <= 100 * tol, c


def test_bicgstab_vanishing_sigma_is_breakdown_never_divergence(_groups):
    # Right after a (re)start the shadow vector is the residual; for a skew operator
    # `<r, A r>` vanishes (exactly, or relative to the norms), which no restart can
    # cure: `breakdown` after that one step, with a finite iterate no worse than the
    # start, never a step with a huge alpha. Exact 0 and a tiny nonzero sigma take
    # different paths in the step (see `BiCGStab.compute`).
    cases = _groups["breakdown"]
    assert len(cases) == 6
    for case in cases.values():
        assert case["breakdown"], case
        assert case["steps"] == 1, case
        assert case["finite"], case
        assert case["rnorm"] <= case["bnorm"] * (1 + 1e-6), case


@pytest.mark.parametrize("name", ["GMRES", "FGMRES"])
def test_gmres_float32_below_floor_stagnates_promptly(name):
    # rtol = atol = 1e-10 is below what float32 can reach (dense 50 x 50, cond 4:
    # the floor eps cond(A) ~ 5e-7 relative is met after about 30 steps). The old
    # rule alone (`stagnation_iters` = 20 restarts without a new best true
    # residual) took 323 steps: the true residual at the floor sets a new best by
    # chance now and then; with `max_steps` 300 it reported `max_steps_reached`.
    # Now three cycles whose estimate ends 4x below the true residual, without the
    # true residual halving, stop it: 48 steps, with the best iterate. (In process:
    # `max_steps` bounds the solve.)
    import jax.numpy as jnp

    n = 50
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(n, n)) / np.sqrt(n) + 2 * np.eye(n)
    b = rng.normal(size=n)
    operator = lx.MatrixLinearOperator(jnp.asarray(matrix, jnp.float32))
    vector = jnp.asarray(b, jnp.float32)
    solver = getattr(lx, name)(rtol=1e-10, atol=1e-10, max_steps=300)
    sol = lx.linear_solve(operator, vector, solver, throw=False)
    assert sol.result == lx.RESULTS.stagnation, sol.result
    assert int(sol.stats["num_steps"]) <= 100, sol.stats["num_steps"]
    b64 = np.asarray(vector, np.float64)
    residual = np.max(np.abs(b64 - matrix @ np.asarray(sol.value, np.float64)))
    # At the floor, and the returned iterate is the one whose residual is reported
    # (the best seen; up to the rounding of that float32 residual). The reported
    # residual is computed in float32, where at the floor its entries are a few
    # units in the last place of O(|b|) values (here it was exactly one, eps): the
    # float64 residual of the same iterate is up to a few such units larger. With
    # XLA's default flags on an AMD EPYC: 3.8e-7 against a reported 1.19e-7 (a
    # slack of 1e-7 failed there; it passed with the tests' flags).
    assert residual <= 1e-6 * np.max(np.abs(b64)), residual
    eps = float(np.finfo(np.float32).eps)
    slack = 4 * eps * np.max(np.abs(b64))
    assert residual <= 2 * float(sol.stats["residual_norm"]) + slack, residual
