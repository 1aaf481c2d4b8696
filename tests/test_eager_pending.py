"""`Solution.stats` and `Solution.state` of an un-jitted solve, computed when
first read (issue 15).

Called outside every transformation, `linear_solve` runs a compiled program
without the statistics (a direct solver's condition estimate was a third of a
10x10 LU solve), returns a `Solution` whose `stats` and `state` are pending
(`_solution.pending_solution`), and computes the statistics with the complete
program when they are first read, however they are read: as an attribute, by
`jax.tree_util`, `jit`, `vmap`, `==`, `repr`, `copy`, `pickle`. These tests
compare what is read with the solve under `jit` (which has no pending fields),
for each direct solver and CG; and pin the mechanism: no condition estimate in
the program run on each call, nothing compiled for the statistics until they
are read."""

import copy
import dataclasses
import pickle
import re
import threading

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from beartype import beartype
from jaxtyping import Array, Float, jaxtyped

import lineax as lx
import lineax._linear_solve as linear_solve_module
import lineax._solution as solution_module


N = 5
_RNG = np.random.default_rng(20261129)
_A = _RNG.normal(size=(N, N)) + N * np.eye(N)
_S = _A @ _A.T + np.eye(N)
_B = _RNG.normal(size=N)
_PSD = (lx.positive_semidefinite_tag,)

# (solver, matrix, tags).
CASES = {
    "LU": (lx.LU(), _A, ()),
    "QR": (lx.QR(), _A, ()),
    "SVD": (lx.SVD(), _A, ()),
    "Cholesky": (lx.Cholesky(), _S, _PSD),
    "Auto": (lx.AutoLinearSolver(well_posed=True), _A, ()),
    "CG": (lx.CG(rtol=1e-12, atol=1e-12, max_steps=50), _S, _PSD),
}


def _operator(name: str) -> lx.MatrixLinearOperator:
    _, matrix, tags = CASES[name]
    return lx.MatrixLinearOperator(jnp.asarray(matrix), tags)


def _pending(solution: lx.Solution) -> bool:
    """Whether some field of `solution` is still pending (read without filling it)."""
    return solution_module._PENDING in solution_module._instance_dict(solution)


# One jitted solve for every case: the solver is static.
_jitted_solve = eqx.filter_jit(lx.linear_solve)


@jaxtyped(typechecker=beartype)
def _eager(name: str, vector: Float[Array, " n"]) -> lx.Solution:
    solver = CASES[name][0]
    return lx.linear_solve(_operator(name), vector, solver)


def _assert_trees_close(got, want) -> None:
    assert jtu.tree_structure(got) == jtu.tree_structure(want)
    for x, y in zip(jtu.tree_leaves(got), jtu.tree_leaves(want)):
        if eqx.is_array(y):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12)
        else:
            assert x == y


@pytest.mark.parametrize("name", sorted(CASES))
def test_pending_stats_and_state_equal_the_jitted_ones(name):
    vector = jnp.asarray(_B)
    solver = CASES[name][0]
    want = _jitted_solve(_operator(name), vector, solver)
    assert want.stats  # each case has statistics to compare
    solution = _eager(name, vector)
    assert _pending(solution)
    np.testing.assert_allclose(solution.value, want.value, rtol=1e-12)
    assert solution.result == lx.RESULTS.successful
    # Read as an attribute, one field at a time.
    assert isinstance(solution.stats, dict)
    assert sorted(solution.stats) == sorted(want.stats)
    _assert_trees_close(solution.stats, want.stats)
    _assert_trees_close(solution.state, want.state)
    assert not _pending(solution)
    # Read whole, by `jax.tree_util`, from a solution with both fields pending.
    _forget_stats_reads()
    fresh = _eager(name, vector)
    assert _pending(fresh)
    _assert_trees_close(fresh, want)
    if name in ("LU", "QR", "Cholesky", "Auto"):
        assert 0 < float(fresh.stats["rcond"]) <= 1
    if name == "CG":
        assert int(fresh.stats["num_steps"]) == int(want.stats["num_steps"]) > 0


@pytest.mark.parametrize("name", ["LU", "CG"])
def test_pending_state_is_reusable(name):
    _forget_stats_reads()
    solver = CASES[name][0]
    operator = _operator(name)
    first = lx.linear_solve(operator, jnp.asarray(_B), solver)
    assert _pending(first)
    again = lx.linear_solve(operator, jnp.asarray(2 * _B), solver, state=first.state)
    want = np.linalg.solve(CASES[name][1], 2 * _B)
    np.testing.assert_allclose(again.value, want, rtol=1e-9)
    # Reading the state leaves the statistics pending.
    fields = solution_module._instance_dict(first)
    assert "state" in fields and "stats" not in fields
    # The state of a solve given `state=` is usable too.
    third = lx.linear_solve(operator, jnp.asarray(3 * _B), solver, state=again.state)
    np.testing.assert_allclose(third.value, 1.5 * want, rtol=1e-9)


@pytest.mark.parametrize("name", ["LU", "CG"])
def test_pending_fields_are_those_of_a_numpy_buffer_as_solved(name):
    # A loop that refills one NumPy matrix in place and keeps each solve's state
    # or statistics: they are computed when read, and were computed from the
    # buffer as it was then (the state of the next matrix, and its rcond,
    # silently), not as it was solved.
    _forget_stats_reads()
    solver, matrix, tags = CASES[name]
    # (Aligned as XLA:CPU wants it for zero-copy: `jnp.asarray(buffer,
    # dtype=buffer.dtype)` then aliases it; with NumPy's own allocation it did,
    # or not, by chance.)
    raw = np.empty(N * N + 16)
    offset = (-raw.ctypes.data % 64) // raw.itemsize
    buffer = raw[offset : offset + N * N].reshape(N, N)
    buffer[:] = matrix
    first = lx.linear_solve(lx.MatrixLinearOperator(buffer, tags), _B, solver)
    assert _pending(first)
    buffer[:] = 2 * np.eye(N)
    again = lx.linear_solve(
        lx.MatrixLinearOperator(jnp.asarray(matrix), tags),
        jnp.asarray(_B),
        solver,
        state=first.state,
    )
    np.testing.assert_allclose(again.value, np.linalg.solve(matrix, _B), rtol=1e-9)
    if name == "LU":
        rcond = 1 / np.linalg.cond(matrix, 1)
        assert 0.1 * rcond <= float(first.stats["rcond"]) <= 10 * rcond


def _forget_stats_reads() -> None:
    """Make each cached entry return pending solutions again: reading the
    fields of many switches an entry to the complete program."""
    for entry in list(linear_solve_module._COMPILED.values()):
        if isinstance(entry, linear_solve_module._Programs):
            entry.fields_read = False
            entry.reads = entry.solves = 0


def _fresh() -> lx.Solution:
    """An un-jitted LU solution, its fields pending."""
    _forget_stats_reads()
    solution = _eager("LU", jnp.asarray(_B))
    assert _pending(solution)
    return solution


def test_pending_solution_goes_through_pytree_code():
    want = _jitted_solve(_operator("LU"), jnp.asarray(_B), lx.LU())
    fresh = _fresh

    def check(solution) -> None:
        assert type(solution) is lx.Solution
        _assert_trees_close(solution, want)

    # Each reads a solution whose fields are all pending.
    check(jtu.tree_map(lambda x: x, fresh()))
    check(jax.jit(lambda s: s)(fresh()))
    check(eqx.filter_jit(lambda s: s)(fresh()))
    check(copy.copy(fresh()))
    check(copy.deepcopy(fresh()))
    check(pickle.loads(pickle.dumps(fresh())))
    check(dataclasses.replace(fresh(), value=want.value))
    check(eqx.tree_at(lambda s: s.value, fresh(), want.value))
    assert eqx.tree_equal(fresh(), want, rtol=1e-12, atol=0)
    assert jtu.tree_structure(fresh()) == jtu.tree_structure(want)
    assert repr(fresh()) == repr(want)
    assert list(vars(fresh())) == list(vars(want))
    paths = [jtu.keystr(p) for p, _ in jtu.tree_flatten_with_path(fresh())[0]]
    assert ".stats['rcond']" in paths
    # `vmap` with the solution as an unbatched argument.
    rcond = jax.vmap(lambda x, s: x * s.stats["rcond"], in_axes=(0, None))(
        jnp.ones(3), fresh()
    )
    np.testing.assert_allclose(rcond, want.stats["rcond"], rtol=1e-12)
    # Not a field: an `AttributeError`, and nothing computed.
    solution = fresh()
    assert not hasattr(solution, "no_such_field")
    assert _pending(solution)


def test_stats_first_read_inside_a_trace_are_concrete():
    # A solution made un-jitted and closed over by a jitted function: its
    # statistics, first read while that function is traced, are the un-jitted
    # solve's arrays, not values of that trace (which would leak out of it).
    solution = _fresh()
    want = _jitted_solve(_operator("LU"), jnp.asarray(_B), lx.LU()).stats["rcond"]

    @jax.jit
    def scaled(x):
        return x * solution.stats["rcond"]

    np.testing.assert_allclose(scaled(2.0), 2 * want, rtol=1e-12)
    assert isinstance(solution.stats["rcond"], jax.Array)
    assert not isinstance(solution.stats["rcond"], jax.core.Tracer)
    np.testing.assert_allclose(solution.stats["rcond"], want, rtol=1e-12)


def _triangular_solves(compiled_text: str) -> int:
    """The triangular solves (LAPACK `trsm` calls) of a compiled program."""
    targets = re.findall(r'custom_call_target="([^"]+)"', compiled_text)
    # (LAPACK's on the CPU, cuBLAS's `__cublas$triangularSolve` on an NVIDIA GPU,
    # where counting "trsm" alone found none: seen on an H200, jax 0.11.2.)
    return sum("trsm" in t or "triangularSolve" in t for t in targets)


def _outputs(compiled_text: str) -> str:
    match = re.search(r"entry_computation_layout=\{\(.*?\)->\((.*?)\)\}", compiled_text)
    assert match is not None
    return re.sub(r"/\*index=\d+\*/", "", match.group(1))


def test_condition_estimate_is_not_compiled_until_read(monkeypatch):
    monkeypatch.setattr(linear_solve_module, "_COMPILED", {})
    operator = _operator("LU")
    vector = jnp.asarray(_B)
    leaves = jtu.tree_leaves((operator, vector, None))
    solution = lx.linear_solve(operator, vector, lx.LU())
    (programs,) = linear_solve_module._COMPILED.values()
    assert isinstance(programs, linear_solve_module._Programs)
    # The program run: the value and the result code. No statistics, nor the
    # state (whose norms only the condition estimate reads).
    lean = programs.lean.lower(leaves).compile().as_text()
    assert lean is not None
    assert _outputs(lean) == f"f64[{N}]{{0}}, s32[]", _outputs(lean)
    # Hager's estimate solves with the factors and their transposes (ten
    # triangular solves): only the solve's own two are in the program.
    assert _triangular_solves(lean) == 2
    assert programs.complete._cache_size() == 0
    rcond = solution.stats["rcond"]
    assert programs.complete._cache_size() == 1
    assert 0 < float(rcond) <= 1
    # One solve whose statistics are read leaves the next ones lean...
    again = lx.linear_solve(operator, 2 * vector, lx.LU())
    assert _pending(again) and not programs.fields_read
    np.testing.assert_allclose(again.stats["rcond"], rcond, rtol=1e-12)
    # ... but callers reading them on (nearly) every solve get the complete
    # program: complete solutions, one program a solve.
    assert lx.linear_solve(operator, 3 * vector, lx.LU()).stats
    assert programs.fields_read
    complete = lx.linear_solve(operator, 4 * vector, lx.LU())
    assert not _pending(complete)
    np.testing.assert_allclose(complete.stats["rcond"], rcond, rtol=1e-12)
    np.testing.assert_allclose(complete.value, np.linalg.solve(_A, 4 * _B), rtol=1e-12)
    # `_cache_size` is private to JAX's jit wrapper, unlisted in its types.
    assert programs.lean._cache_size() == 1  # pyright: ignore[reportAttributeAccessIssue]
    text = programs.complete.lower(leaves).compile().as_text()
    assert text is not None
    assert _triangular_solves(text) > 2
    # A state or statistics read now and then does not switch the entry.
    _forget_stats_reads()
    for i in range(3 * linear_solve_module._READS_WINDOW):
        solution = lx.linear_solve(operator, vector, lx.LU())
        if i % 8 == 0:
            assert solution.state is not None
    assert not programs.fields_read


def test_pending_stats_read_from_threads_at_once():
    solution = _fresh()
    want = _jitted_solve(_operator("LU"), jnp.asarray(_B), lx.LU())
    got = []
    barrier = threading.Barrier(4)

    def read():
        barrier.wait()
        got.append(jtu.tree_leaves(solution))

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 4
    for leaves in got:
        for x, y in zip(leaves, jtu.tree_leaves(want)):
            np.testing.assert_allclose(x, y, rtol=1e-12)
    assert not _pending(solution)


def test_failed_unjitted_solve_reports_and_raises_as_before():
    singular = lx.MatrixLinearOperator(jnp.asarray([[1.0, 2.0], [2.0, 4.0]]))
    nonfinite = lx.MatrixLinearOperator(jnp.asarray([[1.0, np.nan], [0.0, 1.0]]))
    vector = jnp.ones(2)
    for operator, code, message in (
        (singular, lx.RESULTS.singular, "singular"),
        (nonfinite, lx.RESULTS.nonfinite_input, "NaN or inf"),
    ):
        solution = lx.linear_solve(operator, vector, lx.LU(), throw=False)
        want = _jitted_solve(operator, vector, lx.LU(), throw=False)
        assert solution.result == want.result == code
        # (NaN where the solve failed: compared as NumPy does, NaN equal.)
        assert jtu.tree_structure(solution) == jtu.tree_structure(want)
        for x, y in zip(jtu.tree_leaves(solution), jtu.tree_leaves(want)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        with pytest.raises(eqx.EquinoxRuntimeError, match=message):
            lx.linear_solve(operator, vector, lx.LU())


def test_failed_solve_of_an_entry_running_the_complete_program(monkeypatch):
    # An entry switched to the complete program (its callers read the
    # statistics) reports a failure as the lean path does: the code and the
    # message, and, where the operator's action does not read all of its
    # arrays, the traced path's answer (which was handed the program's output
    # state in place of the caller's `state` argument).
    singular = lx.MatrixLinearOperator(jnp.asarray([[1.0, 2.0], [2.0, 4.0]]))
    vector = jnp.ones(2)
    lx.linear_solve(singular, vector, lx.LU(), throw=False)
    programs = [
        entry
        for entry in linear_solve_module._COMPILED.values()
        if isinstance(entry, linear_solve_module._Programs)
    ]
    for entry in programs:
        monkeypatch.setattr(entry, "fields_read", True)
    want = _jitted_solve(singular, vector, lx.LU(), throw=False)
    for reads_every_leaf in (True, False):
        monkeypatch.setattr(
            linear_solve_module, "reads_every_leaf", lambda _, r=reads_every_leaf: r
        )
        solution = lx.linear_solve(singular, vector, lx.LU(), throw=False)
        assert not _pending(solution)
        assert solution.result == want.result == lx.RESULTS.singular
        assert sorted(solution.stats) == sorted(want.stats)
        with pytest.raises(eqx.EquinoxRuntimeError, match="singular"):
            lx.linear_solve(singular, vector, lx.LU())


@pytest.mark.parametrize("how", ["delete", "donate"])
def test_pending_fields_of_a_deleted_input_say_why(how):
    # The pending fields are computed from the solve's inputs when read. A JAX
    # array deleted since (`x.delete()`, or donated to a jitted function) made
    # reading `sol.state` raise JAX's "Array has been deleted with
    # shape=float64[5,5]", which named nothing the caller did to the solution.
    _forget_stats_reads()
    matrix = jnp.asarray(_A)
    solution = lx.linear_solve(
        lx.MatrixLinearOperator(matrix), jnp.asarray(_B), lx.LU()
    )
    assert _pending(solution)
    if how == "delete":
        matrix.delete()
    else:
        jax.jit(lambda x: 2 * x, donate_argnums=0)(matrix)
    assert matrix.is_deleted()
    message = r"`Solution.{}` of a `linear_solve` called un-jitted .*float64\[5, 5\]"
    with pytest.raises(RuntimeError, match=message.format("state")):
        _ = solution.state
    with pytest.raises(RuntimeError, match=message.format("stats")):
        jtu.tree_leaves(solution)
    # What was computed with the solve is still there.
    np.testing.assert_allclose(solution.value, np.linalg.solve(_A, _B), rtol=1e-12)
    assert solution.result == lx.RESULTS.successful


def test_pending_fields_of_a_failed_solve_read_under_debug_nans():
    # A failed solve (`throw=False`) made with `jax_debug_nans` and
    # `jax_debug_infs` off returns pending fields, which were computed (when
    # read) under the flags of the read: its statistics, read under
    # `jax.debug_nans(True)`, raised JAX's "invalid value (nan) encountered in
    # sqrt" from recomputing its NaN value. They are what the solve computed.
    _forget_stats_reads()
    vector = jnp.ones(2)
    for operator, solver in (
        (lx.MatrixLinearOperator(jnp.asarray([[1.0, 2.0], [2.0, 4.0]])), lx.LU()),
        (
            lx.DiagonalLinearOperator(jnp.asarray([1.0, 0.0])),
            lx.Diagonal(well_posed=True),
        ),
    ):
        want = _jitted_solve(operator, vector, solver, throw=False)
        assert want.result == lx.RESULTS.singular
        # (Two solutions: each field is the first read of its own.)
        stats = lx.linear_solve(operator, vector, solver, throw=False)
        state = lx.linear_solve(operator, vector, solver, throw=False)
        assert _pending(stats) and _pending(state)
        with jax.debug_nans(True), jax.debug_infs(True):
            _assert_trees_close(stats.stats, want.stats)
            _assert_trees_close(state.state, want.state)
        assert stats.result == state.result == lx.RESULTS.singular


def test_pending_fields_read_after_x64_was_turned_off():
    # A float64 solve made with `jax_enable_x64` on, its state and statistics
    # read after it was turned off: they were computed then, and the solve's
    # own check refused its float64 arrays ("The solve holds an array of dtype
    # float64 ... convert the operator and the vector"), for a solve that had
    # run. They are what the solve computed.
    _forget_stats_reads()
    vector = jnp.asarray(_B)
    want = _jitted_solve(_operator("LU"), vector, lx.LU())
    solution = _eager("LU", vector)
    assert _pending(solution)
    with jax.enable_x64(False):
        _assert_trees_close(solution.stats, want.stats)
        _assert_trees_close(solution.state, want.state)
    assert solution.stats["rcond"].dtype == jnp.float64
