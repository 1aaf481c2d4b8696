"""A deterministic guard against compile-time regressions (issue 16).

Wall-clock compile time is noisy on shared machines; the size of what is compiled
is not. For a fixed set of small (n = 8, float64) solves -- each direct and each
Krylov solver, primal, JVP and VJP, and `vmap` -- this records

- `jaxpr_eqns`: equations of the jaxpr, recursively (sub-jaxprs of `cond`,
  `while`, `pjit`, ..., and the implementation of each `linear_solve` primitive,
  which is otherwise one opaque equation), and
- `stablehlo_ops`: operations of the lowered, unoptimised module
  (`jax.jit(f).lower(...).as_text()`), which is what this library hands to XLA;
- `hlo_instructions`: instructions of the optimised HLO (`compiled.as_text()`),
  for a few cases only, since it needs an XLA compile (most of the cost);

and fails when one grows over the checked-in table `tests/compile_guard.json`,
so that every growth is a visible, reviewed decision: the jaxpr and StableHLO
counts by any amount (they are exact and machine-independent; a margin let
small growths pass unnoticed, and the table fell behind the code), the optimised
HLO by more than 10% (XLA's CPU passes may differ between machines). Shrinking
passes (regenerate the table to lock the gain in).

To regenerate the table after an intended change (and commit it with the change):

    LINEAX_UPDATE_COMPILE_GUARD=1 python -m pytest tests/test_compile_guard.py

The counts depend on the JAX version: with a different JAX than the one that
recorded the table, the test is skipped (regenerate it to re-arm it).
"""

import json
import os
import pathlib
import re
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

import lineax as lx


TABLE = pathlib.Path(__file__).with_name("compile_guard.json")
UPDATE = bool(os.environ.get("LINEAX_UPDATE_COMPILE_GUARD"))
# The growth each count may show before the test fails: none for the counts of
# what this library hands to XLA, 10% for XLA's optimised HLO.
GROWTH = {"jaxpr_eqns": 1.0, "stablehlo_ops": 1.0, "hlo_instructions": 1.10}
REGENERATE = (
    "LINEAX_UPDATE_COMPILE_GUARD=1 python -m pytest tests/test_compile_guard.py"
)
N = 8


# ---------------------------------------------------------------------------
# Counting


def _subjaxprs(param):
    if isinstance(param, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
        return [param]
    if isinstance(param, (tuple, list)):
        return [s for p in param for s in _subjaxprs(p)]
    return []


def _impl_jaxpr(eqn):
    structs = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
    return jax.make_jaxpr(lambda *xs: eqn.primitive.impl(*xs, **eqn.params))(*structs)


def count_jaxpr_eqns(jaxpr) -> int:
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        # `linear_solve` and its batched version (`eqxi.create_vprim`): count the
        # implementation, which its parameters' jaxprs (a closure-converted
        # matvec) are part of.
        if eqn.primitive.name in ("linear_solve", "vprim"):
            subs = [_impl_jaxpr(eqn)]
        else:
            subs = [s for p in eqn.params.values() for s in _subjaxprs(p)]
        total += sum(count_jaxpr_eqns(s) for s in subs)
    return total


_STABLEHLO_OP = re.compile(r"^\s*(%[^=]*=\s*)?\"?(stablehlo|chlo|func|mhlo|sdy)\.")
_HLO_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?[\w.\-]+\s*=\s*\S")


def count_stablehlo_ops(text: str) -> int:
    return sum(1 for line in text.splitlines() if _STABLEHLO_OP.match(line))


def count_hlo_instructions(text: str) -> int:
    return sum(
        1
        for line in text.splitlines()
        if _HLO_INSTRUCTION.match(line) and not line.lstrip().startswith("HloModule")
    )


def measure(fn, args, compile_: bool) -> dict[str, int]:
    traced = jax.jit(fn).trace(*args)
    lowered = traced.lower()
    out = {
        "jaxpr_eqns": count_jaxpr_eqns(traced.jaxpr),
        "stablehlo_ops": count_stablehlo_ops(lowered.as_text()),
    }
    if compile_:
        hlo = lowered.compile().as_text()
        assert hlo is not None
        out["hlo_instructions"] = count_hlo_instructions(hlo)
    return out


# ---------------------------------------------------------------------------
# The solves: name -> (operator from arrays, arrays, solver)


def _rng(seed):
    return np.random.default_rng(seed)


_SQUARE = jnp.asarray(_rng(0).standard_normal((N, N)) / np.sqrt(N) + 2 * np.eye(N))
_SPD = _SQUARE @ _SQUARE.T + jnp.eye(N)
_TALL = jnp.asarray(_rng(1).standard_normal((N + 2, N)))
_VEC = jnp.asarray(_rng(2).standard_normal(N))
_TALL_VEC = jnp.asarray(_rng(3).standard_normal(N + 2))
_DIAG = jnp.asarray(2.0 + _rng(4).uniform(size=N))
_OFF = jnp.asarray(_rng(5).uniform(-0.5, 0.5, size=N - 1))

_PSD = (lx.positive_semidefinite_tag,)
_SYM = (lx.symmetric_tag,)
_TOL: dict[str, Any] = dict(rtol=1e-8, atol=1e-8)


def _matrix(tags=()):
    return lambda A: lx.MatrixLinearOperator(A, tags)


SOLVES = {
    "lu": (_matrix(), (_SQUARE, _VEC), lx.LU()),
    "qr": (_matrix(), (_TALL, _TALL_VEC), lx.QR()),
    "svd": (_matrix(), (_SQUARE, _VEC), lx.SVD()),
    # (Least squares: its JVP has the terms of a rank-deficient operator, which
    # a square one's shares with no other case.)
    "svd_tall": (_matrix(), (_TALL, _TALL_VEC), lx.SVD()),
    "cholesky": (_matrix(_PSD), (_SPD, _VEC), lx.Cholesky()),
    "diagonal": (lx.DiagonalLinearOperator, (_DIAG, _VEC), lx.Diagonal()),
    "triangular": (
        _matrix((lx.lower_triangular_tag,)),
        (jnp.tril(_SQUARE), _VEC),
        lx.Triangular(),
    ),
    "tridiagonal": (
        lambda d: lx.TridiagonalLinearOperator(d, _OFF, _OFF),
        (_DIAG, _VEC),
        lx.Tridiagonal(),
    ),
    "cg": (_matrix(_PSD), (_SPD, _VEC), lx.CG(**_TOL)),
    "minres": (_matrix(_SYM), (_SPD, _VEC), lx.MINRES(**_TOL)),
    "gmres": (_matrix(), (_SQUARE, _VEC), lx.GMRES(**_TOL)),
    "bicgstab": (_matrix(), (_SQUARE, _VEC), lx.BiCGStab(**_TOL)),
    "lsmr": (_matrix(), (_TALL, _TALL_VEC), lx.LSMR(**_TOL)),
}

# Cases whose optimised HLO is counted too (each costs an XLA compile).
COMPILED = {"lu/primal", "lu/vjp", "cg/primal", "svd/vjp", "svd_tall/vjp"}


def _case(name: str):
    solve_name, transform = name.split("/")
    make_op, args, solver = SOLVES[solve_name]

    def solve(a, b):
        return lx.linear_solve(make_op(a), b, solver).value

    if transform == "primal":
        return solve, args
    if transform == "jvp":
        tangents = tuple(jnp.ones_like(x) for x in args)
        return (lambda a, b: jax.jvp(solve, (a, b), tangents)), args
    if transform == "vjp":
        return jax.grad(lambda a, b: jnp.sum(solve(a, b) ** 2), argnums=(0, 1)), args
    assert transform == "vmap"
    batched = tuple(jnp.stack([x, 2 * x]) for x in args)
    return jax.vmap(solve), batched


CASES = [f"{s}/{t}" for s in SOLVES for t in ("primal", "jvp", "vjp")]
CASES += ["lu/vmap", "cg/vmap"]


# ---------------------------------------------------------------------------


def _load() -> dict:
    if TABLE.exists():
        return json.loads(TABLE.read_text())
    return {"jax_version": jax.__version__, "cases": {}}


def _store(name: str, counts: dict[str, int]) -> None:
    table = _load()
    table["jax_version"] = jax.__version__
    table["cases"][name] = counts
    table["cases"] = dict(sorted(table["cases"].items()))
    TABLE.write_text(json.dumps(table, indent=1) + "\n")


@pytest.mark.parametrize("name", CASES)
def test_compile_size(name):
    fn, args = _case(name)
    counts = measure(fn, args, name in COMPILED)
    if UPDATE:
        _store(name, counts)
        return
    table = _load()
    if table["jax_version"] != jax.__version__:
        pytest.skip(
            f"{TABLE.name} was recorded with jax {table['jax_version']}, this is "
            f"jax {jax.__version__}: regenerate it with `{REGENERATE}`."
        )
    recorded = table["cases"].get(name)
    assert recorded is not None, (
        f"No recorded sizes for `{name}` in {TABLE}; record them with `{REGENERATE}`."
    )
    grown = {
        key: (recorded[key], new)
        for key, new in counts.items()
        if key in recorded and new > GROWTH[key] * recorded[key]
    }
    assert not grown, (
        f"Compiled size of `{name}` grew: "
        + ", ".join(
            f"{k} {old} -> {new} (allowed {GROWTH[k] - 1:.0%})"
            for k, (old, new) in grown.items()
        )
        + f". If intended, regenerate {TABLE.name} with `{REGENERATE}` and commit it."
    )


def test_solve_implementation_traced_once_per_lowering_key():
    # The lowering of a solve keeps its trace of the implementation (the checks,
    # the error branch, the replay of `compute`) per parameters and input shapes:
    # a new function of the same solve lowers it again without tracing it again,
    # and the kept trace still raises with its message, as a fresh one does. On
    # every JAX this library supports: on jax 0.11 and 0.12 the lowering traced
    # the implementation twice per lowering, its own trace (whose constants
    # JAX returned apart from the jaxpr's `constvars`) then `lower_fun`'s, and
    # kept neither (`_trace_with_consts`).
    from lineax import _primitive

    matrix = jnp.asarray(np.diag([2.0, 3.0, 4.0]))
    vector = jnp.asarray([1.0, 2.0, 3.0])

    def new_solve(throw=True):
        def f(a, b):
            op = lx.MatrixLinearOperator(a)
            return lx.linear_solve(op, b, lx.LU(), throw=throw).value

        return jax.jit(f)

    jax.clear_caches()
    assert len(_primitive._IMPL_TRACES) == 0
    calls = []
    rule = _primitive._impl_rule

    def counting_rule(*args, **kwargs):
        calls.append(None)
        return rule(*args, **kwargs)

    _primitive._impl_rule = counting_rule
    try:
        first = new_solve()(matrix, vector)
        assert len(calls) == 1
        second = new_solve()(matrix, vector)
        assert len(calls) == 1  # a cache hit: not traced again
        # A different parameter (`throw`) is another key.
        third = new_solve(throw=False)(matrix, vector)
        assert len(calls) == 2
    finally:
        _primitive._impl_rule = rule
    np.testing.assert_allclose(first, [0.5, 2 / 3, 0.75])
    np.testing.assert_allclose(second, first)
    np.testing.assert_allclose(third, first)
    singular = matrix.at[1, 1].set(0.0)
    with pytest.raises(Exception, match="`linear_solve` failed"):
        jax.block_until_ready(new_solve()(singular, vector))
    assert len(calls) == 2


def test_lowering_falls_back_where_the_trace_constants_are_not_its_constvars(
    monkeypatch,
):
    # jax 0.11 (which `jax>=0.10.2` installs on Python 3.12) kept the private
    # signatures that the lowering of jax 0.10 checks, but returned a trace's
    # constants otherwise than as the values of `jaxpr.constvars`: every solve,
    # jitted or not, on CPU and GPU, failed to lower ("safe_zip() argument 1 has
    # length 0 but argument 0 has length 1"; seen on jax 0.11.2). Such a trace is
    # lowered by JAX's own rule. (Simulated here: one constant more than the
    # constvars.) The cached lowering lowers what JAX's own rule does: the
    # same StableHLO, but that the error branches of a solve's derivative
    # solves share one host callback (its index) where the trace is reused.
    from lineax import _primitive

    def lowered(solve, vector):
        jax.clear_caches()
        text = solve.lower(vector).as_text()
        return re.sub(r"index = \d+ : ui64", "index = N", text)

    matrix = jnp.asarray(np.diag([2.0, 3.0, 4.0]) + 0.5)
    vector = jnp.asarray([1.0, 2.0, 3.0])
    want = np.linalg.solve(np.asarray(matrix), np.asarray(vector))
    op = lx.MatrixLinearOperator(matrix)
    solvers = (lx.LU(), lx.GMRES(rtol=1e-10, atol=1e-10, max_steps=20))
    cached = [
        lowered(jax.jit(lambda b, s=s: lx.linear_solve(op, b, s).value), vector)
        for s in solvers
    ]
    real = _primitive._trace_impl
    assert real is not None

    def newer(*args):
        jaxpr, consts = real(*args)
        return jaxpr, [*consts, np.float32(0.0)]

    monkeypatch.setattr(_primitive, "_trace_impl", newer)
    jax.clear_caches()
    for solver, text in zip(solvers, cached):
        solve = jax.jit(lambda b, s=solver: lx.linear_solve(op, b, s).value)
        np.testing.assert_allclose(solve(vector), want, rtol=1e-8)
        assert lowered(solve, vector) == text
        assert len(_primitive._IMPL_TRACES) == 0
        # (Un-jitted: the cached compiled solve.)
        np.testing.assert_allclose(
            lx.linear_solve(op, vector, solver).value, want, rtol=1e-8
        )
    jax.clear_caches()


def _nested_jits(jaxpr) -> list[str]:
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    names = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("jit", "pjit"):
            names.append(eqn.params["name"])
        if eqn.primitive.name in ("linear_solve", "vprim"):
            subs = [_impl_jaxpr(eqn)]
        else:
            subs = [s for p in eqn.params.values() for s in _subjaxprs(p)]
        names += [n for s in subs for n in _nested_jits(s)]
    return names


@pytest.mark.parametrize("name", ["cg", "gmres", "bicgstab", "minres", "lsmr"])
def test_krylov_solve_has_no_nested_where(name):
    # `jnp.where` is a `jax.jit` of its own: each one a nested function to trace
    # and lower in every solve (CG on a 64 x 64 stencil had 29 of them, 41 of
    # its 411 jaxpr equations, with `RESULTS.where`). These solvers use
    # `_misc.select` and `results_where`, one `select_n` each, instead.
    fn, args = _case(f"{name}/primal")
    names = _nested_jits(jax.make_jaxpr(fn)(*args))
    assert "_where" not in names, names


def test_dead_code_rule_takes_the_live_inputs_of_newer_jax():
    # jax 0.12 (which `jax>=0.10.2` installs on Python 3.12 and later) calls a
    # dead-code rule as `rule(used_outputs, live_ins, eqn)`, jax 0.10 and 0.11 as
    # `rule(used_outputs, eqn)`: with the latter signature alone every solve,
    # jitted or not, failed there ("_dce_rule() takes 2 positional arguments
    # but 3 were given"; seen on jax 0.12.0.1). Both give the same answer.
    from lineax import _primitive

    op = lx.MatrixLinearOperator(jnp.eye(3) * 2.0)
    jaxpr = jax.make_jaxpr(lambda b: lx.linear_solve(op, b, lx.LU()).value)(jnp.ones(3))

    def solves(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive is _primitive.linear_solve_p:
                yield eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from solves(sub)

    (eqn,) = solves(jaxpr.jaxpr)
    live = [True] * len(eqn.invars)
    for used in ([True] * len(eqn.outvars), [True] + [False] * (len(eqn.outvars) - 1)):
        old_inputs, old_eqn = _primitive._dce_rule(used, eqn)
        new_inputs, new_eqn = _primitive._dce_rule(used, live, eqn)
        assert old_inputs == new_inputs
        assert (old_eqn is None) == (new_eqn is None)
        if old_eqn is not None and new_eqn is not None:
            assert old_eqn.params == new_eqn.params


def test_dead_code_rule_drops_an_unused_batched_primitive_with_droppable_effects():
    # Another Equinox batched primitive (a `vprim` not of a solve) gets JAX's own
    # default rule: removed when no output is used and its effects are ones that
    # JAX's dead-code elimination drops (a named axis). The test of effects was
    # looked up in the public `jax.interpreters.partial_eval`, which has none:
    # every effect kept the equation, on every JAX.
    import types

    from jax._src import callback as jax_callback, core as jax_core

    from lineax import _primitive

    droppable = types.SimpleNamespace(
        effects={jax_core.NamedAxisEffect("i")}, invars=[]
    )
    assert not _primitive._has_effects(droppable)
    if jax.__version_info__ >= (0, 12):  # (called with the live inputs there)
        assert not _primitive._has_effects(droppable, [])
    io = jax_callback.OrderedIOEffect()
    kept = types.SimpleNamespace(effects={io}, invars=[])
    assert _primitive._has_effects(kept)
