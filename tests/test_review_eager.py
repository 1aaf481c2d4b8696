"""An adversarial review of `linear_solve` called from plain Python, outside every
JAX transformation (`_linear_solve_entry`, `_run_compiled`), and of what lineax
caches across calls (`_COMPILED`, `_SOLVER_KEYS`, the states `_check_state`
expects, the traces of `_primitive.py`, the structures of `MatrixLinearOperator`).

Reviewed, and found to agree: eager against `jax.jit` bitwise (value, result and
stats) for every solver, with the same errors and result codes for singular,
non-finite and non-converging solves with `throw=True` and `throw=False`; NumPy
arrays mutated in place between calls (including ones closed over by a
`FunctionLinearOperator` with `closure_convert=False`); the x64 flag, dtype
promotion, `jax.disable_jit()` and `jax.clear_caches()` toggled between calls.
Each test here failed before the fix it protects. Values against NumPy float64.
"""

import sys
import threading

import jax.numpy as jnp
import jax.tree_util as jtu

import lineax as lx
import lineax._linear_solve as linear_solve_module


def test_eager_cache_survives_concurrent_evictions(monkeypatch):
    # Solves from several Python threads, with more solvers than the cache holds:
    # every lookup evicts an entry. Unlocked, one thread's eviction iterated over
    # the cache while another changed it (`RuntimeError: dictionary changed size
    # during iteration`, or a `KeyError` where both evicted the same entry). The
    # lookup alone is exercised: compiling a solve per miss would take minutes.
    monkeypatch.setattr(linear_solve_module, "_COMPILED", {})
    monkeypatch.setattr(linear_solve_module, "_COMPILED_MAX", 2)
    operator = lx.MatrixLinearOperator(jnp.eye(2))
    _, treedef = jtu.tree_flatten((operator, jnp.ones(2), {}))
    solvers = [lx.CG(rtol=10.0**-k, atol=0.0) for k in range(1, 7)]
    errors = []

    def lookups(offset):
        try:
            for i in range(1500):
                solver = solvers[(i + offset) % len(solvers)]
                linear_solve_module._compiled_linear_solve(
                    operator,
                    {},
                    linear_solve_module._sentinel,
                    treedef,
                    (),
                    solver,
                    False,
                    None,
                )
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(repr(error))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the race shows at once
    try:
        threads = [threading.Thread(target=lookups, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert len(linear_solve_module._COMPILED) <= 2
