"""`linear_solve` called from plain Python, outside every transformation: one
cached compiled function per structure of the operator and vector and per
solver (`_linear_solve._COMPILED`), called with the flat list of arrays. Its
answers, failures and cache against NumPy and against the traced path."""

import contextlib
import logging
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DelegatingLU, NegatingLU, run_python

import lineax as lx
import lineax._linear_solve as linear_solve_module


_RNG = np.random.default_rng(0)


def _system(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, n)) + n * np.eye(n), rng.standard_normal(n)


def _eager(
    matrix,
    vector,
    solver: lx.AbstractLinearSolver = lx.AutoLinearSolver(well_posed=True),
    **kwargs,
):
    return lx.linear_solve(
        lx.MatrixLinearOperator(jnp.asarray(matrix)),
        jnp.asarray(vector),
        solver,
        **kwargs,
    )


def test_eager_solve_sees_new_values_and_new_shapes():
    # Same structure, new values: the cached function is reused and the answer
    # is the new one; a new shape compiles anew under the same cache entry.
    for n, seed in ((3, 1), (3, 2), (5, 3), (3, 4)):
        matrix, vector = _system(n, seed)
        solution = _eager(matrix, vector)
        np.testing.assert_allclose(
            solution.value, np.linalg.solve(matrix, vector), rtol=1e-12
        )
        assert solution.result == lx.RESULTS.successful


def test_eager_solve_reuses_one_cache_entry_per_structure(monkeypatch):
    monkeypatch.setattr(linear_solve_module, "_COMPILED", {})
    matrix, vector = _system(3, 5)
    _eager(matrix, vector)
    size = len(linear_solve_module._COMPILED)
    assert size == 1
    for seed in range(3):
        _eager(*_system(3, 6 + seed))
    assert len(linear_solve_module._COMPILED) == size
    # Static data (tags) and the solver are part of the key.
    spd = matrix @ matrix.T + np.eye(3)
    lx.linear_solve(
        lx.MatrixLinearOperator(jnp.asarray(spd), lx.positive_semidefinite_tag),
        jnp.asarray(vector),
    )
    _eager(matrix, vector, lx.QR())
    assert len(linear_solve_module._COMPILED) == size + 2


def test_eager_solve_solver_built_anew_reuses_its_entry(monkeypatch):
    # The key holds the solver's structure and fields, not the solver object: a
    # solver built on every call (`lx.CG(...)`) finds the same entry.
    monkeypatch.setattr(linear_solve_module, "_COMPILED", {})
    matrix, vector = _system(3, 11)
    spd = jnp.asarray(matrix @ matrix.T)
    for rtol in (1e-10, 1e-10, 1e-8):
        solution = lx.linear_solve(
            lx.MatrixLinearOperator(spd, lx.positive_semidefinite_tag),
            jnp.asarray(vector),
            lx.CG(rtol=rtol, atol=0.0),
        )
        np.testing.assert_allclose(
            solution.value, np.linalg.solve(spd, vector), rtol=1e-6
        )
    assert len(linear_solve_module._COMPILED) == 2


def test_eager_solve_makes_no_entry_for_what_it_cannot_cache(monkeypatch):
    monkeypatch.setattr(linear_solve_module, "_COMPILED", {})
    matrix, vector = _system(3, 12)
    a, b = jnp.asarray(matrix), jnp.asarray(vector)
    struct = jax.ShapeDtypeStruct((3,), a.dtype)
    for _ in range(2):  # a closure compares by identity: a new key every call
        operator = lx.FunctionLinearOperator(lambda x: a @ x, struct)
        solution = lx.linear_solve(operator, b, lx.LU())
        np.testing.assert_allclose(solution.value, np.linalg.solve(matrix, vector))
    # A NumPy vector is concrete; a Python list is refused, as by the traced path.
    _eager(matrix, np.asarray(vector))
    with pytest.raises((TypeError, ValueError)):
        lx.linear_solve(lx.MatrixLinearOperator(a), list(vector))
    assert len(linear_solve_module._COMPILED) == 1


def test_eager_solve_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(linear_solve_module, "_COMPILED", {})
    monkeypatch.setattr(linear_solve_module, "_COMPILED_MAX", 2)
    matrix, vector = _system(3, 7)
    solvers = (lx.LU(), lx.QR(), lx.SVD(), lx.LU())
    for solver in solvers:
        solution = _eager(matrix, vector, solver)
        np.testing.assert_allclose(
            solution.value, np.linalg.solve(matrix, vector), rtol=1e-10
        )
        assert len(linear_solve_module._COMPILED) <= 2


def test_eager_solve_state_and_stats_match_the_traced_path():
    matrix, vector = _system(4, 8)
    operator = lx.MatrixLinearOperator(jnp.asarray(matrix))
    eager = lx.linear_solve(operator, jnp.asarray(vector), lx.LU())
    traced = eqx.filter_jit(lx.linear_solve)(operator, jnp.asarray(vector), lx.LU())
    for got, want in zip(
        jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(traced)
    ):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    assert jax.tree_util.tree_structure(eager) == jax.tree_util.tree_structure(traced)
    # The state is reusable, as from the traced path.
    again = lx.linear_solve(
        operator, jnp.asarray(2 * vector), lx.LU(), state=eager.state
    )
    np.testing.assert_allclose(again.value, 2 * eager.value, rtol=1e-12)


def test_eager_solve_failure_codes_and_throw():
    singular = np.zeros((2, 2))
    nonfinite = np.array([[1.0, np.nan], [0.0, 1.0]])
    vector = np.ones(2)
    assert _eager(singular, vector, lx.LU(), throw=False).result == (
        lx.RESULTS.singular
    )
    assert _eager(nonfinite, vector, lx.LU(), throw=False).result == (
        lx.RESULTS.nonfinite_input
    )
    with pytest.raises(eqx.EquinoxRuntimeError, match="singular"):
        _eager(singular, vector, lx.LU())
    # A failure does not poison the cache: the next good solve succeeds.
    matrix, good = _system(2, 9)
    np.testing.assert_allclose(
        _eager(matrix, good, lx.LU()).value, np.linalg.solve(matrix, good), rtol=1e-12
    )


def test_eager_solve_keeps_trace_time_checks():
    matrix, vector = _system(3, 10)
    _eager(matrix, vector)  # cached for this structure
    with pytest.raises(ValueError, match="shape"):
        _eager(matrix, np.ones(4))
    with pytest.raises(ValueError, match="square"):
        lx.linear_solve(lx.MatrixLinearOperator(jnp.ones((3, 2))), jnp.ones(3), lx.LU())


class _ScaledLU(DelegatingLU):
    """`LU`, with a field that is a PyTree leaf (`scale`), returned in the
    statistics: its type shows in their dtype."""

    scale: bool | int | float

    def compute(self, state, vector, options):
        solution, result, _ = lx.LU().compute(state, vector, options)
        stats = {"scale": jnp.asarray(self.scale)}
        return solution, result, stats


def test_eager_solve_cache_keys_solver_leaves_by_type(monkeypatch):
    # `True == 1 == 1.0`, and they hash alike: a key holding the solver's leaves
    # by value only made these three solvers share one compiled function, the
    # first one's (whose statistics then had its dtype).
    monkeypatch.setattr(linear_solve_module, "_COMPILED", {})
    matrix, vector = _system(3, 13)
    for scale in (True, 1, 1.0):
        solution = _eager(matrix, vector, _ScaledLU(scale))
        want = jnp.asarray(scale).dtype
        assert solution.stats["scale"].dtype == want
        np.testing.assert_allclose(
            solution.value, np.linalg.solve(matrix, vector), rtol=1e-12
        )
    assert len(linear_solve_module._COMPILED) == 3
    # Traced under `jit`, the primitive's abstract evaluation (cached per solver
    # and input structure) tells them apart too.
    for scale in (True, 1, 1.0):
        stats = jax.jit(_solve_stats, static_argnums=2)(
            jnp.asarray(matrix), jnp.asarray(vector), scale
        )
        assert stats["scale"].dtype == jnp.asarray(scale).dtype


def _solve_stats(matrix, vector, scale):
    operator = lx.MatrixLinearOperator(matrix)
    return lx.linear_solve(operator, vector, _ScaledLU(scale)).stats


@contextlib.contextmanager
def _recorded_compiles(compiled: list, on: bool = True):
    """Append to `compiled` the name of each program JAX compiles in the block
    (none recorded when not `on`)."""

    class _Record(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("Compiling "):
                compiled.append(message.split(" with ")[0])

    handler = _Record(level=logging.DEBUG)
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(on):
            yield
    finally:
        logger.removeHandler(handler)


def test_first_eager_solve_in_a_process_compiles_only_the_solve():
    # The first solve after `jax.clear_caches()` (as the first in a fresh process)
    # compiles one program. `jnp.asarray` of a NumPy scalar, or `jnp.array(True)`,
    # anywhere on the way, compiled a staging program of its own per dtype: two
    # more compiles, about 15 ms on a 2-core CPU, in every first solve.
    matrix, vector = _system(7, 11)
    matrix, vector = jax.device_put(matrix), jax.device_put(vector)
    operator = lx.MatrixLinearOperator(matrix)
    compiled = []
    jax.clear_caches()
    with _recorded_compiles(compiled):
        solution = lx.linear_solve(operator, vector).value
    np.testing.assert_allclose(
        solution, np.linalg.solve(np.asarray(matrix), np.asarray(vector)), rtol=1e-12
    )
    assert compiled == ["Compiling jit(compiled)"], compiled


@pytest.mark.parametrize("convert", [False, True])
def test_first_eager_solve_of_numpy_arrays_compiles_only_the_solve(convert):
    # The same with the NumPy arrays a user passes (issue 16: the un-jitted
    # first call). Their copies were made by JAX: the operator's matrix by
    # `jnp.array(x, dtype, copy=True)` (in `inexact_asarray`), the vector by
    # `jnp.asarray` (in `_on_device`), each a program compiled once per shape
    # and dtype, and again after every `jax.clear_caches()`: three compiles.
    # With `convert`, float64 arrays for a float32 solve (a default user's).
    matrix, vector = _system(7, 11)
    with contextlib.ExitStack() as stack:
        if convert:
            stack.enter_context(jax.enable_x64(False))
        buffers = (np.array(matrix), np.array(vector))
        compiled = []
        jax.clear_caches()
        with _recorded_compiles(compiled):
            solution = lx.linear_solve(lx.MatrixLinearOperator(buffers[0]), buffers[1])
            value = np.asarray(solution.value)
            result = solution.result
        assert result == lx.RESULTS.successful
    want = np.linalg.solve(matrix, vector)
    assert value.dtype == (np.float32 if convert else np.float64)
    np.testing.assert_allclose(value, want, rtol=1e-4 if convert else 1e-12)
    assert compiled == ["Compiling jit(compiled)"], compiled


def test_eager_solve_with_state_options_or_inverse_uses_the_cache(monkeypatch):
    # A reused `state=`, `options` and `lx.invert(operator).mv` ran operation by
    # operation outside of `jit`: 4x (state), 5x (invert) and 18x (CG with
    # `y0`) the time of the compiled solve, n = 300, and of lineax 0.1.1 (whose
    # `linear_solve` is jitted). They now take the cached compiled solve.
    monkeypatch.setattr(linear_solve_module, "_COMPILED", {})
    matrix, vector = _system(4, 13)
    spd = matrix @ matrix.T + np.eye(4)
    operator = lx.MatrixLinearOperator(jnp.asarray(matrix))
    spd_operator = lx.MatrixLinearOperator(
        jnp.asarray(spd), lx.positive_semidefinite_tag
    )
    state = lx.LU().init(operator, {})
    inverse = lx.invert(operator, lx.LU())
    cg = lx.CG(rtol=1e-12, atol=1e-12)
    jacobi = lx.TaggedLinearOperator(
        lx.DiagonalLinearOperator(jnp.asarray(1 / np.diag(spd))),
        lx.positive_semidefinite_tag,
    )
    for k in (1.0, 2.0, 3.0):
        b = jnp.asarray(k * vector)
        want = np.linalg.solve(matrix, k * vector)
        got = lx.linear_solve(operator, b, lx.LU(), state=state).value
        np.testing.assert_allclose(got, want, rtol=1e-12)
        np.testing.assert_allclose(inverse.mv(b), want, rtol=1e-12)
        got = lx.linear_solve(spd_operator, b, cg, options={"y0": b}).value
        np.testing.assert_allclose(got, np.linalg.solve(spd, k * vector), rtol=1e-9)
        got = lx.linear_solve(
            spd_operator, b, cg, options={"preconditioner": jacobi}
        ).value
        np.testing.assert_allclose(got, np.linalg.solve(spd, k * vector), rtol=1e-9)
    # One entry each: state, inverse (the same solve with its own state and
    # options), y0, preconditioner.
    assert len(linear_solve_module._COMPILED) == 4
    # A preconditioner holding a closure compares by identity: no entry.
    closure = lx.FunctionLinearOperator(jacobi.mv, jacobi.in_structure(), jacobi.tags)
    got = lx.linear_solve(
        spd_operator, jnp.asarray(vector), cg, options={"preconditioner": closure}
    ).value
    np.testing.assert_allclose(got, np.linalg.solve(spd, vector), rtol=1e-9)
    assert len(linear_solve_module._COMPILED) == 4
    # The inverse still traces, and differentiates with respect to the vector.
    b = jnp.asarray(vector)
    np.testing.assert_allclose(
        jax.jit(lambda op, b: op.mv(b))(inverse, b), np.linalg.solve(matrix, vector)
    )
    grad = jax.grad(lambda b: jnp.sum(inverse.mv(b)))(b)
    np.testing.assert_allclose(grad, np.linalg.solve(matrix.T, np.ones(4)), rtol=1e-12)
    # Failures with a state: the code and the message of the traced path.
    singular = lx.MatrixLinearOperator(jnp.asarray([[1.0, 2.0], [2.0, 4.0]]))
    singular_state = lx.LU().init(singular, {})
    two = jnp.asarray([1.0, 1.0])
    solution = lx.linear_solve(
        singular, two, lx.LU(), state=singular_state, throw=False
    )
    assert solution.result == lx.RESULTS.singular
    with pytest.raises(eqx.EquinoxRuntimeError, match="singular"):
        lx.linear_solve(singular, two, lx.LU(), state=singular_state)
    with pytest.raises(eqx.EquinoxRuntimeError, match="singular"):
        lx.invert(singular, lx.LU()).mv(two)


def test_eager_solve_whose_solution_holds_non_arrays_compiles_once(monkeypatch):
    # LSMR's `damp` option reformulated the operator as a closure-converted
    # function, which the returned state kept: not a valid output of a compiled
    # function. The cached path raised a TypeError (JAX: "not a valid JAX type")
    # from `lx.linear_solve(op, b, lx.LSMR(...), options={"damp": d})` called
    # un-jitted; then ran eagerly, compiling LSMR's loop anew on every call
    # (0.56 s a call, against 0.2 ms compiled). The non-arrays are now static
    # data of the compiled output: one compile, new values seen, state reusable.
    # (The damped operator is now all arrays; the user-defined solver's state,
    # below, still holds a function.)
    monkeypatch.setattr(linear_solve_module, "_COMPILED", {})
    rng = np.random.default_rng(5)
    tall = rng.normal(size=(12, 4))
    b = rng.normal(size=12)
    op = lx.MatrixLinearOperator(jnp.asarray(tall))
    solver = lx.LSMR(1e-10, 1e-10)
    compiled = []
    for i, damp in enumerate((0.7, 0.3, 2.0)):
        expected = np.linalg.solve(tall.T @ tall + damp**2 * np.eye(4), tall.T @ b)
        options = {"damp": jnp.asarray(damp)}
        with _recorded_compiles(compiled, on=i > 0):
            sol = lx.linear_solve(op, jnp.asarray(b), solver, options=options)
        assert sol.result == lx.RESULTS.successful
        np.testing.assert_allclose(sol.value, expected, atol=1e-8)
        again = lx.linear_solve(
            op, jnp.asarray(2 * b), solver, options=options, state=sol.state
        )
        np.testing.assert_allclose(again.value, 2 * expected, atol=1e-8)
    # A user-defined solver whose state holds a Python function.
    square = lx.MatrixLinearOperator(jnp.asarray(tall.T @ tall + np.eye(4)))
    for i, scale in enumerate((1.0, 3.0)):
        with _recorded_compiles(compiled, on=i > 0):
            sol = lx.linear_solve(square, jnp.asarray(scale * b[:4]), NegatingLU())
        np.testing.assert_allclose(
            sol.value, -np.linalg.solve(square.as_matrix(), scale * b[:4]), atol=1e-8
        )
    assert compiled == []
    entries = list(linear_solve_module._COMPILED.values())
    assert linear_solve_module._EAGER not in entries


def test_eager_normal_krylov_solve_of_a_function_operator_compiles_once(
    monkeypatch,
):
    # `Normal(CG())` transposes a function operator in `init`: a new jaxpr on
    # every call, and the trace of `compute` was cached by the state's structure,
    # that jaxpr included (by identity), so every un-jitted solve traced and
    # compiled the solve again: 570-880 ms a call, 10 ms now (n = 5, 2-core CPU).
    # The state holds the function in its structure, compared by its text.
    # (Op by op throughout: the solve compiled whole, after `_EAGER_BUDGET`
    # seconds of these, is tests/test_review_fnop.py's.)
    monkeypatch.setattr(linear_solve_module, "_EAGER_BUDGET", float("inf"))
    matrix = jnp.asarray(_system(5, 3)[0])
    struct = jax.ShapeDtypeStruct((5,), matrix.dtype)
    operator = lx.FunctionLinearOperator(lambda v: jnp.tanh(matrix) @ v, struct)
    want = np.linalg.solve(np.tanh(np.asarray(matrix)), np.arange(5.0))
    solver = lx.Normal(lx.CG(1e-10, 1e-10))
    compiled = []
    for i in range(3):
        with _recorded_compiles(compiled, on=i > 0):
            sol = lx.linear_solve(operator, jnp.arange(5.0), solver)
        np.testing.assert_allclose(sol.value, want, rtol=1e-7)
    assert compiled == [], compiled


_ON_ERROR_NAN_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
import lineax as lx
op = lx.MatrixLinearOperator(jnp.asarray([[1.0, 2.0], [2.0, 4.0]]))
b = jnp.asarray([1.0, 1.0])
state = lx.LU().init(op, {})
for solve in (
    lambda: lx.linear_solve(op, b, lx.LU()),
    lambda: lx.linear_solve(op, b, lx.LU(), state=state),
    jax.jit(lambda: lx.linear_solve(op, b, lx.LU())),
):
    solution = solve()
    assert np.all(np.isnan(solution.value)), solution.value
    assert solution.result == lx.RESULTS.singular
assert np.all(np.isnan(lx.invert(op, lx.LU()).mv(b)))
print("OK")
"""


def test_eager_solve_honours_eqx_on_error_nan():
    # With `EQX_ON_ERROR=nan` (Equinox's switch: NaN instead of an error), a
    # failed `throw=True` solve returns NaN under `jit`; un-jitted, the cached
    # compiled path raised `EquinoxRuntimeError` from the host (also via
    # `lx.invert(operator).mv`). The flag is read at import: a subprocess.
    proc = run_python(_ON_ERROR_NAN_SCRIPT, env={"EQX_ON_ERROR": "nan"})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_matrix_operator_built_again_skips_equinox_construction(monkeypatch):
    # `lx.linear_solve(lx.MatrixLinearOperator(A), b)` un-jitted builds an
    # operator on every call: 11 us (10x10, CPU), 8 of them in Equinox's
    # generic construction checks. A second build from a concrete array with
    # tags seen before is made from a cached PyTree structure (1.2 us): the same
    # operator, without running `__init__` (whose `inexact_asarray` is counted).
    import lineax._operator.matrix as matrix_module

    matrix = jnp.asarray(_system(3, 14)[0])
    first = lx.MatrixLinearOperator(matrix, lx.symmetric_tag)
    calls = []
    original = matrix_module.inexact_asarray
    monkeypatch.setattr(
        matrix_module, "inexact_asarray", lambda x: calls.append(x) or original(x)
    )
    for again in (
        lx.MatrixLinearOperator(matrix, lx.symmetric_tag),
        lx.MatrixLinearOperator(matrix, tags=lx.symmetric_tag),
        lx.MatrixLinearOperator(2 * matrix, lx.symmetric_tag),
    ):
        assert type(again) is lx.MatrixLinearOperator
        assert jax.tree_util.tree_structure(again) == (
            jax.tree_util.tree_structure(first)
        )
        assert again.tags == frozenset([lx.symmetric_tag])
        assert lx.is_symmetric(again)
    assert calls == []
    # What `__init__` checks or converts is still checked or converted.
    with pytest.raises(ValueError, match="2-D"):
        lx.MatrixLinearOperator(matrix[0], lx.symmetric_tag)
    with pytest.raises(TypeError, match="strings"):
        lx.MatrixLinearOperator(matrix, "symmetric")
    with pytest.raises(TypeError, match="list"):
        lx.MatrixLinearOperator([[1.0]], lx.symmetric_tag)
    integer = lx.MatrixLinearOperator(jnp.ones((2, 2), jnp.int32), lx.symmetric_tag)
    assert jnp.issubdtype(integer.matrix.dtype, jnp.floating)
    numpy = lx.MatrixLinearOperator(np.ones((2, 2)), lx.symmetric_tag)
    assert isinstance(numpy.matrix, jax.Array)
    traced = jax.jit(lambda m: lx.MatrixLinearOperator(m, lx.symmetric_tag).mv(m[0]))
    np.testing.assert_allclose(traced(matrix), matrix @ matrix[0], rtol=1e-12)


def _record_calls(monkeypatch, owner, name: str, calls: list, keep=None) -> None:
    """Replace `owner.name`, for the test, by the function that appends its
    positional arguments to `calls` (those that `keep` accepts) and calls it."""
    original = getattr(owner, name)

    def recorded(*args, **kwargs):
        if keep is None or keep(*args):
            calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)


def _holds_an_operator(tree, *args) -> bool:
    """Whether a flattened `tree` is an operator or a tuple holding one (the
    solve's inputs; `jnp.asarray` and others flatten their own arguments)."""
    parts = tree if isinstance(tree, tuple) else (tree,)
    return any(isinstance(x, lx.AbstractLinearOperator) for x in parts)


def test_eager_solve_cache_hit_makes_no_trace_and_no_solver_flatten(monkeypatch):
    # On a hit (same structure, new operator object, the same solver object) the
    # un-jitted solve runs the cached compiled function: no trace, no compile, no
    # new entry, and the solver is not flattened again (its part of the key is
    # remembered by identity; 1.3 us of each lookup).
    monkeypatch.setattr(linear_solve_module, "_COMPILED", {})
    monkeypatch.setattr(linear_solve_module, "_SOLVER_KEYS", {})
    matrix, vector = _system(4, 15)
    solver = lx.LU()
    _eager(matrix, vector, solver)
    traces, flattened = [], []
    _record_calls(monkeypatch, linear_solve_module, "_linear_solve", traces)
    _record_calls(monkeypatch, jax.tree_util, "tree_flatten", flattened)
    for seed in (16, 17):
        matrix, vector = _system(4, seed)
        solution = _eager(matrix, vector, solver)
        np.testing.assert_allclose(
            solution.value, np.linalg.solve(matrix, vector), rtol=1e-12
        )
    assert traces == []
    assert not any(args[0] is solver for args in flattened)
    assert len(linear_solve_module._COMPILED) == 1
    # A solver built anew is keyed by its fields (see below) and finds the same entry.
    _eager(matrix, vector, lx.LU())
    assert len(linear_solve_module._COMPILED) == 1
    assert traces == []


def test_eager_solve_keys_a_new_solver_by_its_fields(monkeypatch):
    # A solver built anew on every call (`lx.linear_solve(op, b, lx.LU())`) is
    # keyed by its fields, not flattened (`jtu.tree_flatten` and the hash of its
    # treedef were 5 of the 15 us it added to a 10x10 solve); solvers whose
    # fields differ, in value or type, still get compiled functions of their own.
    monkeypatch.setattr(linear_solve_module, "_COMPILED", {})
    matrix, vector = _system(4, 18)
    solvers = [
        lambda: lx.LU(),
        lambda: lx.AutoLinearSolver(well_posed=True),
        lambda: lx.AutoLinearSolver(well_posed=None),
        lambda: lx.Normal(lx.Cholesky()),
    ]
    for make in solvers:
        _eager(matrix, vector, make())
    assert len(linear_solve_module._COMPILED) == 4
    flattened = []
    _record_calls(monkeypatch, jax.tree_util, "tree_flatten", flattened)
    for make in solvers:
        solver = make()
        solution = _eager(matrix, vector, solver)
        np.testing.assert_allclose(
            solution.value, np.linalg.solve(matrix, vector), rtol=1e-10
        )
        assert not any(args[0] is solver for args in flattened), type(solver)
    assert len(linear_solve_module._COMPILED) == 4


def test_unjitted_failed_solve_of_a_function_operator_has_a_jax_result_code():
    # Outside every trace a result code is a JAX array, as every other array of
    # the solution is. A singular LU solve of a function operator (solved op by
    # op, not by the cached compiled solve) returned `RESULTS.singular`'s own
    # NumPy value, and its `throw=True` error check (typed for JAX arrays)
    # failed on it under runtime type checking.
    matrix = jnp.array([[1.0, 0.0], [0.0, 0.0]], jnp.float32)
    operator = lx.FunctionLinearOperator(
        lambda x: matrix @ x, jax.ShapeDtypeStruct((2,), jnp.float32)
    )
    vector = jnp.ones(2, jnp.float32)
    solution = lx.linear_solve(operator, vector, lx.LU(), throw=False)
    assert solution.result == lx.RESULTS.singular
    assert isinstance(solution.result._value, jax.Array)


def _flat_key(operator, solver, value_only: bool = False) -> tuple:
    """The `_COMPILED` key under which `_linear_solve._run_flat` finds the
    solve of a `register_flat` operator (see `_flat_structure`)."""
    structure = (type(operator), operator.tags)
    return (structure, value_only, None, linear_solve_module._solver_key(solver))


def test_warm_matrix_solve_takes_the_flat_path(monkeypatch):
    # The hot path of `lx.linear_solve(lx.MatrixLinearOperator(A), b, solver)`:
    # the operator's fields read from its `__dict__` and the entry found by its
    # class and tags, with no PyTree flatten and no call of the general path
    # (`_linear_solve_entry`, whose flatten and structure took 3 of the 11 us
    # around a 10x10 solve's compiled call). Its answers, results and errors
    # are the general path's.
    monkeypatch.setattr(linear_solve_module, "_COMPILED", {})
    solver = lx.LU()
    matrix, vector = _system(4, 30)
    first = _eager(matrix, vector, solver)
    operator = lx.MatrixLinearOperator(jnp.asarray(matrix))
    (key,) = linear_solve_module._COMPILED
    assert key == _flat_key(operator, solver)
    entries, flattened = [], []
    _record_calls(monkeypatch, linear_solve_module, "_linear_solve_entry", entries)
    _record_calls(
        monkeypatch, jax.tree_util, "tree_flatten", flattened, _holds_an_operator
    )
    for seed in (31, 32):
        matrix, vector = _system(4, seed)
        solution = _eager(matrix, vector, solver)
        np.testing.assert_allclose(
            solution.value, np.linalg.solve(matrix, vector), rtol=1e-12
        )
        assert solution.result == lx.RESULTS.successful
    singular = np.zeros((4, 4))
    assert _eager(singular, vector, solver, throw=False).result == (lx.RESULTS.singular)
    nonfinite = np.eye(4)
    nonfinite[0, 1] = np.nan
    assert _eager(nonfinite, vector, solver, throw=False).result == (
        lx.RESULTS.nonfinite_input
    )
    with pytest.raises(eqx.EquinoxRuntimeError, match="singular"):
        _eager(singular, vector, solver)
    assert entries == [] and flattened == []
    monkeypatch.undo()
    # The state and statistics, pending, are those of the general path's solve.
    eager = _eager(*_system(4, 30), solver)
    for got, want in zip(
        jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(first)
    ):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    assert jax.tree_util.tree_structure(eager) == jax.tree_util.tree_structure(first)


class _MatrixWithScale(lx.MatrixLinearOperator):
    """A subclass with a field of its own: its PyTree structure differs, and so
    does its action."""

    scale: float = eqx.field(static=True)

    def __init__(self, matrix, scale):
        super().__init__(matrix)
        self.scale = scale

    def mv(self, vector):
        return self.scale * super().mv(vector)

    def as_matrix(self):
        return self.scale * self.matrix


class _PlainSubclass(lx.MatrixLinearOperator):
    """A subclass with no field of its own (the same fields, another class)."""


def test_flat_path_keys_apart_what_flattens_apart(monkeypatch):
    # The flat key (class and static values) is taken only for an operator of
    # exactly a `register_flat` class with JAX arrays; anything else keeps its
    # PyTree structure as its key. A subclass of `MatrixLinearOperator` with a
    # field of its own, or none, another tag, a NumPy vector, an operator with
    # an attribute beyond its fields: each has an entry of its own, and its own
    # answer (a shared entry would solve the scaled operator as the plain one).
    monkeypatch.setattr(linear_solve_module, "_COMPILED", {})
    matrix, vector = _system(3, 33)
    a, b = jnp.asarray(matrix), jnp.asarray(vector)
    solver = lx.AutoLinearSolver(well_posed=True)
    plain = lx.MatrixLinearOperator(a)
    extra = lx.MatrixLinearOperator(a)
    object.__setattr__(extra, "__doc__", "an attribute beyond the fields")
    spd = jnp.asarray(matrix @ matrix.T + np.eye(3))
    cases = [
        (plain, b, np.linalg.solve(matrix, vector)),
        (_MatrixWithScale(a, 2.0), b, np.linalg.solve(2 * matrix, vector)),
        (_MatrixWithScale(a, 4.0), b, np.linalg.solve(4 * matrix, vector)),
        (_PlainSubclass(a), b, np.linalg.solve(matrix, vector)),
        (extra, b, np.linalg.solve(matrix, vector)),
        (
            lx.MatrixLinearOperator(spd, lx.positive_semidefinite_tag),
            b,
            np.linalg.solve(spd, vector),
        ),
        (plain, np.asarray(vector), np.linalg.solve(matrix, vector)),
    ]
    for _ in range(2):  # (the second round through the caches)
        for operator, rhs, want in cases:
            solution = lx.linear_solve(operator, rhs, solver)
            np.testing.assert_allclose(solution.value, want, rtol=1e-10)
    keys = list(linear_solve_module._COMPILED)
    assert len(keys) == len(cases)
    flat = [key for key in keys if not isinstance(key[0], jax.tree_util.PyTreeDef)]
    assert flat == [
        _flat_key(plain, solver),
        _flat_key(cases[5][0], solver),
    ]
    # Another dtype, shape or weak type of the same class and tags shares the
    # entry (JAX's own cache of the `jit` tells them apart), each solved in its
    # own dtype.
    for x, y in (
        (a.astype(jnp.float32), b.astype(jnp.float32)),
        (a[:2, :2], b[:2]),
        (a, jnp.broadcast_to(jnp.asarray(2.0), (3,))),  # weakly typed
        (jnp.diag(jnp.broadcast_to(jnp.asarray(2.0), (3,))), b),
        (a, jnp.asarray([1, 2, 3])),
    ):
        solution = lx.linear_solve(lx.MatrixLinearOperator(x), y, solver)
        want = np.linalg.solve(np.asarray(x, np.float64), np.asarray(y, np.float64))
        assert solution.value.dtype == x.dtype
        np.testing.assert_allclose(solution.value, want, rtol=1e-5)
    assert len(linear_solve_module._COMPILED) == len(cases)
    # A vector in a container has the leaves of the vector itself, not its
    # structure: refused as by the traced path, not solved by the plain entry.
    for wrapped in ((b,), [b], {"b": b}):
        with pytest.raises(ValueError, match="structure"):
            lx.linear_solve(plain, wrapped, solver)


def test_flat_path_is_not_taken_inside_a_trace(monkeypatch):
    # A warm entry, then the same call inside `jit`, `vmap`, `grad`, a named
    # axis and `jax.checkpoint`, with the operator and vector closed over
    # (concrete arrays, but traced solves): the flat path must leave them to the
    # traced path (it would read a traced result code on the host), and so must
    # the debug flags (see `_linear_solve_entry`).
    matrix, vector = _system(3, 34)
    a, b = jnp.asarray(matrix), jnp.asarray(vector)
    want = np.linalg.solve(matrix, vector)
    solver = lx.LU()

    def solve(scale: Any = 1.0):
        return lx.linear_solve(lx.MatrixLinearOperator(a), scale * b, solver).value

    np.testing.assert_allclose(solve(), want, rtol=1e-12)
    runs = []
    original = linear_solve_module._Programs.__init__

    def record(self, *args):
        runs.append(args)
        return original(self, *args)

    monkeypatch.setattr(linear_solve_module._Programs, "__init__", record)
    np.testing.assert_allclose(jax.jit(solve)(), want, rtol=1e-12)
    np.testing.assert_allclose(
        jax.vmap(solve)(jnp.ones(2)), np.stack([want, want]), rtol=1e-12
    )
    np.testing.assert_allclose(
        jax.vmap(solve, axis_name="i")(jnp.ones(2)), np.stack([want, want]), rtol=1e-12
    )
    np.testing.assert_allclose(
        jax.grad(lambda s: solve(s).sum())(1.0), want.sum(), rtol=1e-12
    )
    np.testing.assert_allclose(jax.checkpoint(solve)(1.0), want, rtol=1e-12)
    with jax.debug_nans(True):
        np.testing.assert_allclose(solve(), want, rtol=1e-12)
    assert runs == []


def test_inline_trace_test_agrees_with_jax():
    # `_run_flat` reads JAX's trace state inline (`_misc.TRACE` and
    # `TRACE_AXES`): it must say "no trace" where `no_active_trace` does, and
    # nowhere else.
    from lineax._misc import EVAL_TRACE, no_active_trace, TOP_AXES, TRACE, TRACE_AXES

    seen = []

    def record(x: Any = None) -> Any:
        inline = TRACE.value is EVAL_TRACE and TRACE_AXES.value is TOP_AXES
        seen.append((inline, no_active_trace()))
        return x

    record()
    jax.jit(record)(1.0)
    jax.vmap(record)(jnp.ones(2))
    jax.vmap(record, axis_name="i")(jnp.ones(2))
    jax.grad(lambda x: record(x) ** 2)(1.0)
    jax.jvp(record, (1.0,), (1.0,))
    jax.eval_shape(record, 1.0)

    @jax.jit
    def compile_time_eval(x):
        with jax.ensure_compile_time_eval():
            record()
        return x

    compile_time_eval(1.0)
    assert [inline for inline, _ in seen] == [clean for _, clean in seen]
    assert seen[0] == (True, True)
    assert all(inline is False for inline, _ in seen[1:-1])


def test_cache_eviction_keeps_an_entry_the_flat_path_used(monkeypatch):
    # `_run_flat` finds its entry without the lock, so without moving it to the
    # end of `_COMPILED` (least recently used first out): it marks it `used`,
    # and eviction moves such an entry to the end once, instead of dropping it
    # (a solve repeated in a loop is not compiled again because others were
    # solved in between).
    monkeypatch.setattr(linear_solve_module, "_COMPILED", {})
    monkeypatch.setattr(linear_solve_module, "_COMPILED_MAX", 2)
    matrix, vector = _system(3, 35)
    lu, qr, svd = lx.LU(), lx.QR(), lx.SVD()
    _eager(matrix, vector, lu)
    _eager(matrix, vector, qr)
    operator = lx.MatrixLinearOperator(jnp.asarray(matrix))
    assert list(linear_solve_module._COMPILED) == [
        _flat_key(operator, lu),
        _flat_key(operator, qr),
    ]
    _eager(matrix, vector, lu)  # by `_run_flat`: no move
    assert list(linear_solve_module._COMPILED)[0] == _flat_key(operator, lu)
    _eager(matrix, vector, svd)  # evicts QR's, not LU's
    assert list(linear_solve_module._COMPILED) == [
        _flat_key(operator, lu),
        _flat_key(operator, svd),
    ]
    assert not linear_solve_module._COMPILED[_flat_key(operator, lu)].used
    _eager(matrix, vector, qr)  # now LU's, unused since
    assert list(linear_solve_module._COMPILED) == [
        _flat_key(operator, svd),
        _flat_key(operator, qr),
    ]


def test_solver_built_again_skips_equinox_construction(monkeypatch):
    # `lx.linear_solve(op, b, lx.LU())` builds a solver on every call: Equinox's
    # construction took 10 us of an un-jitted 10x10 solve (`LU()`), 20 for
    # `AutoLinearSolver(well_posed=True)`. A lineax solver built again with the
    # same scalar arguments is copied from the first (`_SolverMeta`): the same
    # solver, a new object, without running `__init__` or `__check_init__`.
    import lineax._solver.base as solver_base

    monkeypatch.setattr(solver_base, "_BUILT", {})
    makes = [
        lambda: lx.LU(),
        lambda: lx.AutoLinearSolver(well_posed=True),
        lambda: lx.AutoLinearSolver(None),
        lambda: lx.CG(rtol=1e-3, atol=1e-6, max_steps=10),
        lambda: lx.GMRES(1e-3, 1e-6, restart=5),
    ]
    firsts = [make() for make in makes]
    checks = []
    for cls in (lx.AutoLinearSolver, lx.CG, lx.GMRES):
        for parent in cls.__mro__:
            check = parent.__dict__.get("__check_init__")
            if check is not None:
                monkeypatch.setattr(
                    parent,
                    "__check_init__",
                    lambda self, check=check: checks.append(self) or check(self),
                )
    for make, first in zip(makes, firsts):
        again = make()
        assert type(again) is type(first) and again is not first
        assert vars(again) == vars(first)
        assert [type(x) for x in vars(again).values()] == [
            type(x) for x in vars(first).values()
        ]
        assert jax.tree_util.tree_structure(again) == (
            jax.tree_util.tree_structure(first)
        )
        assert again == first and hash(again) == hash(first)
    assert checks == []
    monkeypatch.undo()
    matrix, vector = _system(3, 36)
    np.testing.assert_allclose(
        _eager(matrix, vector, lx.LU()).value, np.linalg.solve(matrix, vector)
    )


def test_solver_built_again_keeps_its_checks_and_its_arguments_apart(monkeypatch):
    # Arguments never seen, or not scalars, are built by Equinox (and checked);
    # arguments equal by `==` (and hash) but not alike (`1`, `True`, `1.0`;
    # `0.0`, `-0.0`) are keyed apart: `max_steps=True` after `max_steps=1` is
    # still refused, and `rtol=-0.0` kept as given. A solver holding a module,
    # or of a class defined outside lineax, is built by Equinox every time.
    import lineax._solver.base as solver_base

    monkeypatch.setattr(solver_base, "_BUILT", {})
    equinox_call = type(eqx.Module).__call__

    def outcome(build, cls, args, kwargs):
        try:
            solver = build(cls, *args, **kwargs)
        except (TypeError, ValueError) as error:
            return type(error), str(error)
        return [(type(x), repr(x)) for x in vars(solver).values()]

    cases = [
        (lx.AutoLinearSolver, (), {"well_posed": value})
        for value in (True, 1, 1.0, 2, None)
    ] + [
        (lx.GMRES, (value, 1e-6), {"max_steps": steps})
        for value in (1, 1.0, True, 0.0, -0.0, 0.5)
        for steps in (1, True, 1.0, None)
    ]
    for _ in range(2):
        for cls, args, kwargs in cases:
            case = (cls, args, kwargs)
            assert outcome(type(cls).__call__, *case) == outcome(equinox_call, *case)
    assert isinstance(lx.GMRES(-0.0, 1e-6).rtol, float)
    assert str(lx.GMRES(-0.0, 1e-6).rtol) == "-0.0"
    with pytest.raises(ValueError, match="max_steps"):
        lx.GMRES(1e-3, 1e-6, max_steps=True)
    for _ in range(2):
        inner = lx.Cholesky()
        assert lx.Normal(inner).inner_solver is inner
    built = []

    class Counted(DelegatingLU):
        def __check_init__(self):
            built.append(self)

    for _ in range(3):
        Counted()
    assert len(built) == 3
    assert Counted not in solver_base._BUILT
