"""The `linear_solve_p` primitive: implementation, abstract evaluation, the
pseudoinverse JVP, the transpose rule, and (through `equinox.internal.create_vprim`)
batching.

Binding a primitive, rather than tracing the solver directly, is what makes every
solver differentiable for free: autodiff never sees the solver's internals (a
factorisation, a `while_loop`), only this primitive, whose derivative is expressed
through further solves with the same state.
"""

import contextlib
import dataclasses
import functools as ft
import importlib
import inspect
from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.core
import jax.extend.core as jex_core
import jax.interpreters.ad as ad
import jax.interpreters.partial_eval as pe
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree

from ._errors import branch_on_code, raise_everywhere
from ._misc import (
    cast_keeping_real,
    is_inexact_array,
    jit_when_eagerly_transformed,
    nan_where,
    note_explicit_axes,
    select,
    ShardingTypeError,
    stack_alike_leaves,
    tree_all_finite,
    tree_conj,
    tree_finite_test,
    tree_is_complex,
    varying_like,
)
from ._operator.base import (
    AbstractLinearOperator,
    check_structures_equal,
    conj,
    matrix_is_stored,
    reads_every_leaf,
)
from ._operator.tangent import TangentLinearOperator
from ._solution import concrete_value, is_successful, RESULTS, results_where
from ._solver.base import (
    AbstractLinearSolver,
    rank_flags,
    statistics_unused,
    statistics_wanted,
)


# Which solve failed, for the error raised under `throw=True`: the user's own
# ("primal") solve, the same with a state passed by the user
# ("primal-reused-state"), one made by the JVP rule ("tangent"), or one made by
# the transpose rule in reverse mode ("cotangent").
_KIND_PREFIX = {
    "primal": "`linear_solve` failed: ",
    "primal-reused-state": "`linear_solve` failed: ",
    "tangent": (
        "A tangent linear solve failed (one made by the JVP of `linear_solve`, "
        "e.g. under `jax.jvp`/`jax.grad`), although the primal solve had no error: "
    ),
    "cotangent": (
        "A cotangent linear solve failed (one made by the transpose of "
        "`linear_solve`, in reverse-mode differentiation): "
    ),
}


def _is_none(x: Any) -> bool:
    return x is None


def _is_inexact(x: Any) -> bool:
    """Whether `x` is a floating or complex array *or scalar*. Under `jax.grad`,
    JAX hands a JVP rule the primal value of a Python float as a `float` subclass
    (`TypedFloat`), not an array: a test for arrays only would drop its tangent."""
    if x is None or isinstance(x, bool) or not eqx.is_array_like(x):
        return False
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _probe(
    operator: AbstractLinearOperator, code: Array | None = None
) -> PyTree[Array]:
    """The probe of `_operator_action`.

    With the (traced, nonnegative) failure `code` of `_error_if_failed`, written
    as a function of it: XLA then makes the probe where it is written, outside
    the error branch, rather than moving the constant into the branch (it folds
    the `select` later, once the broadcast is placed)."""
    value = 1.0 / max(operator.in_size(), 1)

    def leaf(s):
        entry = jnp.full((), value, s.dtype)
        if code is not None:
            entry = select(code < 0, jnp.zeros((), s.dtype), entry)
        return jnp.broadcast_to(entry, s.shape)

    return jtu.tree_map(leaf, operator.in_structure())


def _operator_action(
    operator: AbstractLinearOperator, probe: PyTree[Array] | None = None
) -> PyTree[Array]:
    """The operator applied to one positive probe (`_probe(operator)`, made here
    if not given), whose output is finite exactly when the operator's action is.

    Only what the operator computes counts: a leaf it never reads (an unused
    `±inf` bound in a `JacobianLinearOperator`'s `args`) must not make the input
    "non-finite". Every entry of a matrix reaches the product with a vector of
    positive entries, so a NaN or inf there shows in the output (`inf - inf` is
    NaN). The probe is `1 / in_size` rather than `1`, so that no sum of finite
    products can overflow; it is not zero, which BLAS-style kernels may skip.
    """
    if probe is None:
        probe = _probe(operator)
    return operator.mv(probe)


def _array_leaves(operator: AbstractLinearOperator) -> list[Array] | None:
    """The inexact array leaves of `operator`, if its action reads every one of
    them (a matrix, the diagonals of a tridiagonal operator, ...: see
    `reads_every_leaf`); else `None` (a function or Jacobian operator may hold
    arrays it never reads, e.g. an unused `±inf` bound)."""
    # (Any failure of a user's registration means "no": the probe is always
    # correct.)
    try:
        reads = reads_every_leaf(operator)
    except Exception:  # noqa: BLE001
        reads = False
    if not reads:
        return None
    return [x for x in jtu.tree_leaves(operator) if is_inexact_array(x)]


def _operator_inputs(
    operator: AbstractLinearOperator,
    arrays: list[Array] | None,
    probe: PyTree[Array] | None = None,
) -> list[Array]:
    """What tells whether the operator is finite: its arrays if it reads every one
    of them (`arrays`, from `_array_leaves`), else its action on a probe (see
    `_operator_action`)."""
    if arrays is not None:
        return arrays
    action = jtu.tree_leaves(_operator_action(operator, probe))
    return [x for x in action if is_inexact_array(x)]


def _is_primal(kind: str) -> bool:
    return kind in ("primal", "primal-reused-state")


def _messages(kind: str) -> list[str]:
    prefix = _KIND_PREFIX[kind]
    return [
        "" if message == "" else prefix + message
        for message in RESULTS._index_to_message
    ]


def primal_failure_message(code: int) -> str:
    """The error message of a failed primal solve with result code `code`."""
    return _messages("primal")[code]


def _linear_solve_impl(
    operator: AbstractLinearOperator,
    state: PyTree,
    vector: PyTree[Array],
    options: dict[str, Any],
    solver: AbstractLinearSolver,
    throw: bool | None,
    kind: str,
    with_stats: bool,
) -> tuple[PyTree[Array], RESULTS, dict[str, Any]]:
    solution, result, stats = _compute_traced(
        solver, state, vector, options, with_stats
    )
    # A non-finite operator can give a finite solution (`x / inf = 0`, and BLAS
    # skips the zero entries of a right-hand side): the primal solve tests the
    # operator's arrays too, if they are its input (a matrix, not a closure), in
    # one reduction with the solution (see `tree_all_finite`). With a state
    # passed by the user, it tests the boolean that the solver's `init` recorded
    # instead, where there is one (the dense solvers, see
    # `recorded_operator_finite`): no O(n^2) scan next to an O(n^2) solve. (A
    # state made by this solve is not asked if the operator's arrays are tested:
    # XLA then removes `init`'s test.) An operator whose arrays are not its input
    # (a function, a Jacobian) has only the recorded test of the matrix that
    # `init` materialised: without it, `[[inf, 2], [2, 4]]` solves to a finite
    # "success" (and cuSOLVER's LU gives finite solutions from matrices holding
    # inf and NaN, where LAPACK's give NaN).
    # Its derivative solves use the same operator, already tested.
    arrays = _array_leaves(operator)
    record = solver.recorded_operator_finite(state)
    computed = False
    if (
        record is not None
        and _is_primal(kind)
        and arrays is not None
        and not matrix_is_stored(operator)
    ):
        computed = True
        # Finite arrays, but a matrix computed from them (a product, a sum, a
        # scaling) that overflowed: `[[1e200, 1e200], [0, 1]] @ diag(1e200, 1)`
        # solved to a finite, wrong `(-0, 1)` with LU, QR and SVD, reported
        # successful (as in lineax 0.1.1). `init`'s test of the matrix it
        # factorised tells: the solve is `singular`. The arrays are tested as a
        # stored matrix's are (below), so that non-finite ones are still
        # `nonfinite_input`; the record is kept out of the error branch's
        # inputs, where an overflow would have read as `nonfinite_input` too. A
        # stored matrix is its arrays: this costs nothing there.
        result = RESULTS.where(record, result, RESULTS.singular)
    recorded = None
    if not computed and (
        kind == "primal-reused-state" or (kind == "primal" and arrays is None)
    ):
        recorded = record
    checked = arrays if _is_primal(kind) and recorded is None else None
    index = None
    if throw and recorded is None and concrete_value(result._value) is not None:
        # A direct solver's concrete code: the error branch is chosen by the
        # finiteness test's own bits (`index`, see `tree_finite_test`), and the
        # code computed from them only if the caller reads `result`.
        finite, index = tree_finite_test((solution, checked), index=True)
    elif throw is None and checked is not None and record is not None:
        # The un-jitted entry point's compiled solve returns the state, and with
        # it `init`'s test of the matrix (`operator_is_finite`, the dense
        # solvers): tested apart from the solution, the operator's test is that
        # one, merged by XLA, where folded into the solution's it was a second
        # pass over the matrix (the same boolean either way). That pass decided
        # where the program runs: XLA:CPU runs a program that its cost analysis
        # puts under 1000 flops on the calling thread, and hands any other to
        # its thread pool and back (about 15 us, as much as all of an un-jitted
        # `jnp.linalg.solve` at n = 10). Cost-analysis flops of the program at
        # n = 10: LU 1407 -> 1129, QR 1154 -> 876; LU, Cholesky and SVD now run
        # on the calling thread up to n = 9, QR up to n = 10 (before: n = 8).
        finite = tree_all_finite(solution) & tree_all_finite(checked)
    else:
        finite = tree_all_finite((solution, checked))
    if recorded is not None:
        finite = finite & recorded
    # The inputs besides the operator: the vector, and an initial guess, whose NaN
    # a Krylov solver reported as a `breakdown` ("the operator is singular").
    inputs = (vector, options.get("y0"))
    if throw is None:
        # The un-jitted entry point's compiled solve (`throw=None`): the caller
        # reads the result code on the host and examines the inputs there, if
        # the solve failed. Nothing else is compiled.
        return solution, _with_singular(result, finite), stats
    if throw:
        # Non-finite input makes a solver fail or return non-finite output; with
        # `throw=True` telling the two apart only chooses the error message, so
        # it is done in the error branch, mostly on the host: nothing of it is
        # compiled into the path of a successful solve. The branch receives the
        # solver's `result` and `finite`, from which it derives the rest, so
        # that nothing else is computed outside it.
        # What is returned if no error is raised (or `EQX_ON_ERROR` says not to);
        # the branch's code, not computed a second time.
        # The operator is passed only where the error branch probes its action:
        # run eagerly, `_error_if_failed` is compiled once per static data of
        # its arguments, and an operator's holds its Python scalars (`A * 0.5`
        # keeps `0.5` static): each new scalar compiled it again (about 80 ms).
        # Nor where this solve's `init` recorded the test of the matrix it
        # materialised from the operator, which tests its whole action: the
        # probe traced the user's function once more, and compiled a copy of it
        # into the branch (an LU solve of a function operator: 3 traces of the
        # function, 0.1.1 2). (A state passed by the user may be another
        # operator's.)
        tested = kind == "primal" and recorded is not None
        probed = operator if arrays is None and not tested else None
        solution, result = _error_if_failed(
            solution, probed, arrays, inputs, result, finite, recorded, kind, index
        )
        return solution, result, stats
    # The inputs are only examined when the solve failed, which saves a pass over
    # the operator in the common case. (The predicate is made unbatched, so that
    # under `vmap` this stays a real branch rather than a `select`.)
    failed = _failed(result, finite)
    if arrays is None and recorded is not None:
        # A function or Jacobian operator whose matrix `init` materialised and
        # tested (Optimistix's Newton, Diffrax's VeryChord): that test and an
        # O(n) test of the vector, without a conditional. The probe of the
        # operator's action compiled a second copy of the user's linearised
        # function into every Newton step; and with the conditional (even
        # testing only the vector), a vmapped float32 Kvaerno5 on Robertson took
        # 18453 steps over 200 initial values (at most 404 for one) where 0.1.1
        # takes 16607 (160), and a batch of 40 ran one member to `max_steps`.
        # Unbatched, the step counts were equal. (Measured, not explained.)
        finite_input = tree_all_finite(inputs) & recorded
    else:
        finite_input = lax.cond(
            eqxi.unvmap_any(failed),
            lambda: tree_all_finite((inputs, _operator_inputs(operator, arrays))),
            # (The branches must agree on the mesh axes they vary over.)
            lambda: varying_like(jnp.array(True), (vector, operator)),
        )
    result = results_where(
        finite_input, _with_singular(result, finite), RESULTS.nonfinite_input
    )
    if not _is_primal(kind):
        # A failed derivative solve must not look like a valid derivative: its
        # `result` cannot be reported (the primal outputs of a JVP must not
        # depend on tangents), so it is made visible as NaN instead.
        solution = jtu.tree_map(lambda x: nan_where(failed, x), solution)
    return solution, result, stats


def _failed(result: RESULTS, finite: Array) -> Array:
    return ~_is_successful(result) | ~finite


def _is_successful(result: RESULTS) -> Array:
    """`result == RESULTS.successful`, without Equinox's eager comparison: for a
    concrete `result` (the direct solvers' constant) that dispatches a tiny JAX
    program, compiled anew on every first call after `jax.clear_caches()` (about
    30 ms of an un-jitted first call); NumPy compares a concrete code for free
    (see `concrete_value`)."""
    return jnp.asarray(is_successful(result))


def _with_singular(result: RESULTS, finite: Array) -> RESULTS:
    """A solver reporting success with non-finite output hit a singular system.
    (The direct solvers make their solution infinite at an exactly zero pivot, see
    `inf_at_zero_pivots`: this one test covers both.)"""
    if concrete_value(result._value) is not None:
        # A concrete code (the direct solvers' success): one select of it.
        if not is_successful(result):
            return result
        return results_where(finite, result, RESULTS.singular)
    return results_where(_is_successful(result) & ~finite, RESULTS.singular, result)


def host_result_code(code: Any, *leaves: Any) -> np.ndarray:
    """`code`, or `nonfinite_input` if the solve failed (`code` is not zero) and
    some leaf is not finite; on the host, with NumPy."""
    code = np.asarray(code)
    if code != RESULTS.successful._value and not all(
        np.all(np.isfinite(np.asarray(x))) for x in leaves
    ):
        return np.asarray(RESULTS.nonfinite_input._value, code.dtype)
    return code


# Compiled when run under a transformation applied eagerly (the primitive's
# implementation under an un-jitted `vmap`), so that the error is raised as an
# `EquinoxRuntimeError`, as `branched_error_if` does on its own; inline when staged.
# (Staged, not merely traced: under an un-jitted `vmap` the inputs are tracers of
# an eager computation, and inline the failure came out as XLA's runtime error,
# the message after a traceback.) Inline, too, with concrete arrays (the
# implementation run eagerly: an un-jitted solve of an operator that is not
# cacheable, the tangent and cotangent solves of an un-jitted `jax.jvp` or
# `jax.grad`): `branch_on_code` then branches in Python, and the error is raised
# by the host check itself. Compiled there, it was compiled again for every
# operator whose static data was a new object: the transpose of a
# `FunctionLinearOperator` is a new closure at every call.
@jit_when_eagerly_transformed
def _error_if_failed(
    solution, operator, arrays, others, result, finite, recorded, kind, index=None
):
    # `others`: the inputs besides the operator (a PyTree). `operator`: the
    # operator whose action the error branch probes, or `None` for no probe.
    # Only the predicate is computed outside the branch: the branch receives the
    # arrays it examines, not `finite` (which XLA would compute as a kernel of its
    # own, for the branch's use only). They enter the conditional (and the
    # callback) with their leaves of one shape and dtype stacked (see
    # `stack_alike_leaves`). `arrays` is `_array_leaves(operator)`.
    checked = []
    if arrays is not None and _is_primal(kind):
        checked, _ = stack_alike_leaves(arrays)
    if recorded is not None:
        # `init`'s test of the matrix it materialised, as an input the host tests
        # with the others (NaN if it failed): for a function operator it is the
        # only test of that matrix, which the probe of its action may miss.
        # (float32 whatever the solve's dtype: Python numbers would make it a
        # float64 select on the success path, slow on a GPU and an error on a
        # TPU; it only carries the NaN.)
        checked.append(select(recorded, np.float32(0), np.float32(np.nan)))
    inputs, _ = stack_alike_leaves(
        [x for x in jtu.tree_leaves(others) if is_inexact_array(x)]
    )
    solution, unstack_solution = stack_alike_leaves(solution)
    # The branch is chosen by the failure code itself (nonzero: failed), which
    # the error branch also hands to the host: one scalar kernel computes both,
    # where a predicate of its own was a second one. Or, given the `index` of
    # the finiteness test (a concrete code, see `_linear_solve_impl`), by that
    # index, and the host is handed the solver's code (success, whose host test
    # of the solution tells `singular`): the failure code is then computed only
    # where the caller reads `result`.
    solver_code = result._value
    result = _with_singular(result, finite)
    code = result._value
    if index is not None:
        code = index
    # The probe of the operator's action enters the branch as an operand, made
    # outside it. Made inside, XLA folded the constant probe into the product,
    # and compiled a copy of the operator's action (of the user's function) for
    # the branch alone; applied to an array, the product reads like the solve's
    # own products, and XLA:CPU compiles a kernel once for the fusions that read
    # alike (CG on a 64 x 64 stencil: the branch's pad and stencil kernels are
    # the step's; the probe, a broadcast, is the kernel of the zero initial
    # guess with the default flags, a kernel of its own without the fusion
    # emitters: 22 -> 20 kernels compiled, and 28 -> 27, see
    # tests/test_krylov_kernels.py).
    # (A concrete code is branched on in Python, see `branch_on_code`: the error
    # branch then makes its probe, only where it is taken.)
    probe = None
    if operator is not None and concrete_value(code) is None:
        probe = _probe(operator, jnp.asarray(code))
    host_code = code if index is None else jnp.asarray(solver_code, jnp.int32)
    solution = branch_on_code(
        code,
        ft.partial(_raise, operator, checked, inputs, host_code, kind),
        lambda x: x[0],
        (solution, probe),
    )
    return unstack_solution(solution), result


def _raise(operator, checked, inputs, code, kind, operand):
    """The error branch of a solve with `throw=True`: raise with the message of
    the failure, or of `nonfinite_input` if the operator or the vector is not
    finite.

    One host callback (`raise_everywhere`) finds the failure code and raises: it
    receives the result code, the solution, the arrays whose finiteness the solve
    tested (`checked`: the primal solve's operator arrays, and `init`'s recorded
    test of the matrix it made, if any) and the inputs (the
    vector, and the action of `operator`, if given, on a probe: an operator whose
    action may not read all of its arrays, see `_operator_inputs`), and tests them
    with NumPy. Under `vmap` it examines every batch element and raises the
    largest code. (A derivative solve's operator, if made of arrays, is the
    primal solve's, whose arrays the primal solve has tested.)
    """
    solution, probe = operand  # (`probe`: see `_error_if_failed`)
    solution_leaves = [x for x in jtu.tree_leaves(solution) if is_inexact_array(x)]
    operands = [code, *solution_leaves, *checked, *inputs]
    if operator is not None:
        operands += stack_alike_leaves(_operator_inputs(operator, None, probe))[0]
    index_fn = ft.partial(
        _host_failure_code,
        n_solution=len(solution_leaves),
        n_tested=len(solution_leaves) + len(checked),
    )
    return raise_everywhere(solution, operands, _messages(kind), index_fn)


def _host_failure_code(code: Any, *arrays: Any, n_solution: int, n_tested: int) -> int:
    """On the host: zero if the solve succeeded (`code` is zero and the first
    `n_tested` arrays, the solution and the inputs tested with it, are finite),
    else its failure code: `nonfinite_input` if an input (every array after the
    first `n_solution`) is not finite."""
    code = int(code)
    finite = [bool(np.all(np.isfinite(x))) for x in arrays]
    if code == RESULTS.successful._value:
        if all(finite[:n_tested]):
            return code
        code = int(RESULTS.singular._value)
    if not all(finite[n_solution:]):
        return int(RESULTS.nonfinite_input._value)
    return code


def _to_struct(x: Any) -> Any:
    """An array's or an abstract value's shape, dtype, weak type (which `compute`
    may promote differently) and, inside `jax.shard_map`, the mesh axes it varies
    over, as a `jax.ShapeDtypeStruct`; anything else as it is. The abstract
    evaluation (given abstract values) and the implementation (given arrays) both
    key their trace of `compute` by it, so that the second finds the first's (see
    `_traced_compute`)."""
    if isinstance(x, jax.core.ShapedArray):
        aval = x
    elif eqx.is_array(x):
        aval = jax.typeof(x)
    else:
        return x
    weak = bool(getattr(aval, "weak_type", False))
    # With `check_vma=True` (the default), `shard_map` types each value by the
    # manual axes it varies over, and a primitive mixing a varying value with an
    # unvarying one is an error: a trace of `compute` at unvarying inputs (what a
    # shape and dtype alone give) compares a pivot with a constant, or carries a
    # loop state, of another type than the inputs it is evaluated at. (`None`
    # outside `shard_map`, as a struct made from a shape and dtype has.)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is None or not mat.varying:
        # (Inside `jax.shard_map`, with the sharding of every value there: a
        # closure-converted function of the operator's, e.g. a
        # `JacobianLinearOperator`'s, accepts no other.)
        return _with_mesh_sharding(
            jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=weak)
        )
    return jax.ShapeDtypeStruct(
        aval.shape,
        aval.dtype,
        weak_type=weak,
        sharding=aval.sharding,
        manual_axis_type=mat,
    )


def _with_mesh_sharding(struct: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """`struct`, inside a `jax.shard_map`, with the sharding that every value
    there has (unsharded over the abstract mesh in context) where it has none;
    `struct` itself elsewhere.

    `jax.make_jaxpr` and `jax.eval_shape` return the outputs of a trace there
    without one, and a shape and dtype alone make an abstract value over no
    mesh: a solution of another sharding than the vectors computed there, which
    a closure-converted `FunctionLinearOperator` refuses (a JVP's tangent
    product); and, in a `shard_map` over some of the mesh's axes
    (`axis_names=`), a struct varying over manual axes with no sharding is one
    JAX cannot make an abstract value of at all (an `AssertionError` in
    `get_mat`, raised by every solve there)."""
    mesh = jax.sharding.get_abstract_mesh()
    if struct.sharding is not None or not mesh.manual_axes:
        return struct
    return jax.ShapeDtypeStruct(
        struct.shape,
        struct.dtype,
        weak_type=struct.weak_type,
        sharding=jax.sharding.NamedSharding(mesh, jax.P(*[None] * len(struct.shape))),
        manual_axis_type=struct.manual_axis_type,
    )


def _to_aval(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        x = _with_mesh_sharding(x)
        if x.sharding is None:
            return jax.core.ShapedArray(x.shape, x.dtype)
        if x.manual_axis_type is None:
            return jax.core.ShapedArray(x.shape, x.dtype, sharding=x.sharding)
        return jax.core.ShapedArray(
            x.shape, x.dtype, sharding=x.sharding, manual_axis_type=x.manual_axis_type
        )
    return x


def _linear_solve_abstract_eval(
    operator, state, vector, options, solver, throw, kind, with_stats
):
    # The checks of `_linear_solve_impl` change no shape: only `compute` is traced,
    # and its trace is kept for the lowering (see `_traced_compute`).
    del operator, throw, kind, with_stats
    args = jtu.tree_map(_to_struct, (state, vector, options))
    key = _abstract_eval_key(solver, args)
    # One `get`, not `key in` then `[key]`: another thread's `put` (emptying a
    # full cache) or `jax.clear_caches()` between the two raised `KeyError`.
    cached = None if key is None else _ABSTRACT_EVALS.get(key)
    if cached is not None:
        return cached
    traced = _traced_compute(solver, args, key)
    solution, result, stats = eqx.combine(traced.out_struct, traced.out_static)
    # (`result` as `_linear_solve_impl` returns it.)
    # (A shape, not `jnp.array(True)`: that would compile a staging program on
    # the first call in a process.)
    finite = jax.ShapeDtypeStruct((), jnp.bool_)
    result = eqx.filter_eval_shape(_with_singular, result, finite)
    out = jtu.tree_map(_to_aval, (solution, result, stats))
    _ABSTRACT_EVALS.put(key, out)
    return out


# The output shapes of `solver.compute` depend only on the solver and on the
# structure, shapes and dtypes of its inputs (and on the x64 flag): traced once
# per such key, not on every bind. A gradient of one solve binds the primitive
# four times (primal, JVP, tangent and cotangent solves), each of which traced
# `compute` in full only to learn its output shapes (about 4 ms each of a dense
# n = 100 solve's trace time, measured).
class _TraceCache(dict):
    """A dict that `jax.clear_caches()` empties, as it empties JAX's own caches
    of traced functions (so that a first call after it pays the whole trace)."""

    # JAX's registry is a weak-key dictionary: each cache is its own key.
    __eq__ = object.__eq__
    __hash__ = object.__hash__  # pyright: ignore[reportAssignmentType]

    # Emptied when full: each entry may hold the constants of a trace.
    max_size = 256

    def put(self, key: Any, value: Any) -> None:
        """Store `value` under `key`, unless `key` is `None` (not cacheable)."""
        if key is None:
            return
        if len(self) >= self.max_size:
            self.clear()
        self[key] = value

    def cache_clear(self) -> None:
        self.clear()

    def cache_info(self) -> str:
        return f"{len(self)} entries"

    def cache_keys(self) -> list:
        return list(self)


_ABSTRACT_EVALS = _TraceCache()
# The traces of `compute` themselves (see `_traced_compute`).
_TRACES = _TraceCache()

try:  # Not public API: else the x64 flag alone (see `_trace_context`).
    from jax._src.config import trace_context as _jax_trace_context
    from jax._src.mesh import empty_abstract_mesh as _empty_abstract_mesh
except ImportError:  # pragma: no cover
    _jax_trace_context = None
    _empty_abstract_mesh = None

try:  # Not public API: a solve traced under `vmap` (see `_compute_traced`).
    from jax._src.interpreters.batching import BatchTracer as _BatchTracer
except ImportError:  # pragma: no cover
    _BatchTracer = ()

try:  # Equinox's batched primitive (not public API): see `_dce_rule`.
    from equinox.internal._primitive import _vprim_p
except ImportError:  # pragma: no cover
    _vprim_p = None


def _private_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:  # pragma: no cover
        return None


def _register_private_cache(cache: Any, name: str) -> None:
    # JAX's registry of caches (not public API), which `jax.clear_caches()`
    # empties: without it, never emptied by JAX.
    register = getattr(_private_module("jax._src.util"), "register_cache", None)
    if register is not None:
        register(cache, name)


_register_private_cache(_ABSTRACT_EVALS, "lineax abstract evaluation")
_register_private_cache(_TRACES, "lineax traces of compute")


def _trace_context() -> Any:
    """The configuration that tracing depends on, as JAX's own caches of traced
    functions key it (the x64 flag, the default matmul precision, the mesh in
    context, ...): a cached trace is reused only where JAX would reuse its own.
    (Like JAX's caches of `lax.cond`/`while_loop` bodies, the key holds a user's
    functions by identity: one reading a global that changes is impure, and
    JAX reuses its traces of such functions too.)"""
    if _jax_trace_context is None:  # pragma: no cover - a future JAX
        return bool(jax.config.jax_enable_x64)  # pyright: ignore[reportAttributeAccessIssue]
    # JAX lowers a program inside an empty abstract mesh, which tracing reads as
    # no mesh at all (`jax._src.mesh.get_abstract_mesh`): the same key, so that the
    # lowering reuses the abstract evaluation's trace of `compute`.
    return tuple(
        None
        if type(x) is type(_empty_abstract_mesh) and x == _empty_abstract_mesh
        else x
        for x in _jax_trace_context()
    )


def _abstract_eval_key(solver, args) -> tuple | None:
    # The solver by its structure, the type of each field (static ones
    # included) and its leaves with their types: `True == 1 == 1.0`, but a
    # solver holding one traces differently from one holding another.
    solver_leaves, solver_treedef = jtu.tree_flatten(solver)
    fields = dataclasses.fields(solver) if dataclasses.is_dataclass(solver) else ()
    leaves, treedef = jtu.tree_flatten(args)
    key = (
        type(solver),
        solver_treedef,
        tuple(type(getattr(solver, f.name, None)) for f in fields),
        tuple((type(x), x) for x in solver_leaves),
        treedef,
        _trace_context(),
        *[
            (x.shape, x.dtype, x.weak_type, x.manual_axis_type)
            if isinstance(x, jax.ShapeDtypeStruct)
            else (type(x), x)
            for x in leaves
        ],
    )
    try:
        hash(key)
    except TypeError:  # a solver or option holding arrays, unhashable static data
        return None
    return key


def bind(
    operator: AbstractLinearOperator,
    state: PyTree,
    vector: PyTree[Array],
    options: dict[str, Any],
    solver: AbstractLinearSolver,
    throw: bool | None,
    kind: str,
) -> tuple[PyTree[Array], RESULTS, dict[str, Any]]:
    # `with_stats` is always `True` here; `_dce_rule` sets it to `False`.
    return eqxi.filter_primitive_bind(
        linear_solve_p, operator, state, vector, options, solver, throw, kind, True
    )


def _conj_transpose_solve(operator, state, vector, options, solver, throw, complex_):
    """Solve with `A^H` (= `A^T` for real operators), reusing `state`."""
    state_t, options_t = solver.transpose(state, options)
    operator_t = _transposed(operator)
    if complex_:
        state_t, options_t = solver.conj(state_t, options_t)
        operator_t = conj(operator_t)
    return bind(operator_t, state_t, vector, options_t, solver, throw, "tangent")[0]


def _transposed(operator: AbstractLinearOperator) -> AbstractLinearOperator:
    """`operator.transpose()`, raising a ValueError naming the operator's class,
    at trace time, where its structures are not the operator's swapped. Reverse
    mode (and the JVP of a least-squares solve) solves with it; a user's operator
    whose `transpose` got a shape wrong failed deep in `lax` ("dot_general
    requires contracting dimensions to have the same shape") or, for a direct
    solver, silently returned the cotangent of another problem."""
    operator_t = operator.transpose()
    what = (
        f"`{type(operator).__name__}.transpose()` must return an operator from "
        "the operator's output structure to its input structure (reverse-mode "
        "differentiation solves with it); its {} structure is wrong"
    )
    check_structures_equal(
        operator_t.in_structure(),
        operator.out_structure(),
        what.format("input"),
        expected=True,
    )
    check_structures_equal(
        operator_t.out_structure(),
        operator.in_structure(),
        what.format("output"),
        expected=True,
    )
    return operator_t


def _nones(tree):
    return jtu.tree_map(lambda _: None, tree)


def _promoted(*xs):
    """`xs` cast to their common dtype, promoted explicitly: the leaves of a
    mixed-dtype PyTree operator's vectors (`float32` with `float64`, say) may differ
    between the user's `vector` and `operator.mv(...)`, and
    `jax_numpy_dtype_promotion="strict"` forbids promoting them implicitly."""
    dtype = ft.reduce(np.promote_types, [jnp.result_type(x) for x in xs])
    return [jnp.asarray(x, dtype) for x in xs]


def _tree_add(*trees):
    def add(*xs):
        first, *rest = _promoted(*xs)
        return sum(rest, first)

    return jtu.tree_map(add, *trees)


def _tree_sub(x, y):
    return jtu.tree_map(lambda xi, yi: jnp.subtract(*_promoted(xi, yi)), x, y)


def _tree_neg(tree):
    return jtu.tree_map(jnp.negative, tree)


def _as_tangent(primal, tangent):
    """`tangent` with zeros for symbolic-zero (`None`) leaves; `None` stays where
    the primal has no value (a PyTree vector with `None` leaves)."""
    return jtu.tree_map(
        lambda p, t: t if t is not None or p is None else jnp.zeros_like(p),
        primal,
        tangent,
        is_leaf=_is_none,
    )


def _initial_guess(solver, operator, options, t_options, dependent_columns):
    """`(y0, dy0)` when the answer depends on the initial guess, else `None`s:
    the guess as the solver uses it (see `AbstractLinearSolver.initial_guess`).

    A solver that uses an initial guess `y0` and may meet dependent columns
    returns
    `x = y0 + A^+ (b - A y0)`: the pseudoinverse solution plus the part of `y0` in
    the null space of `A`. (This is lineax's Krylov solvers' contract; a Krylov
    method's correction lies in the Krylov space of `A^H`, i.e. the row space.)
    With independent columns the null space is trivial and `y0` changes nothing.
    """
    y0 = options.get("y0", None)
    if y0 is None or not dependent_columns:
        return None, None
    guess = solver.initial_guess(operator, y0)
    if guess is None:
        return None, None
    t_y0 = t_options.get("y0", None) if isinstance(t_options, dict) else None
    if t_y0 is not None and len(jtu.tree_leaves(t_y0)) == 0:
        t_y0 = None
    if t_y0 is not None:
        # (`initial_guess` is linear in `y0`: it maps the tangent alike.)
        t_y0 = solver.initial_guess(operator, _as_tangent(y0, t_y0))
    return guess, t_y0


def _concrete_array(x: Any) -> Array:
    # Evaluated eagerly: inside a JVP rule `jnp.asarray` would bind to the trace
    # being built and return a tracer, not the constant that `x` is. (NumPy
    # values are put on the device directly: `jnp.asarray` of one compiles a
    # staging program per dtype, a cost of every first solve in a process.)
    with jax.core.eval_context():
        if isinstance(x, (np.ndarray, np.generic)):
            return jax.device_put(x)
        return jnp.asarray(x)


def _arrays_where_differentiated(primal, tangent):
    """Convert the primal scalars that carry a tangent (Python floats arrive here
    as `TypedFloat`s under `jax.grad`) to (weakly typed) arrays, as they were when
    the operator was built: every differentiated leaf stays a dynamic argument of
    the primitive's inner binds, and a closure-converted function (a Jacobian
    operator's) is called with the arrays it was converted with."""
    return jtu.tree_map(
        lambda p, t: p if t is None or isinstance(p, jax.Array) else _concrete_array(p),
        primal,
        tangent,
        is_leaf=_is_none,
    )


def _linear_solve_jvp(primals, tangents):
    operator, state, vector, options, solver, throw, kind, _ = primals
    t_operator, _, t_vector, t_options, _, _, _, _ = tangents
    # The tangents of `state` are ignored: the state is derived from the operator,
    # whose own tangent is used instead. Of `options`, only `y0` can change the
    # answer (see `_initial_guess`); the preconditioner never does.
    # Every inexact leaf carries its tangent, Python and NumPy scalars included.
    t_operator = jtu.tree_map(
        lambda p, t: t if t is not None and _is_inexact(p) else None,
        operator,
        t_operator,
        is_leaf=_is_none,
    )
    operator = _arrays_where_differentiated(operator, t_operator)
    # JAX hands a JVP rule a constant primal (a NumPy right-hand side, when only
    # the operator is differentiated) as the NumPy array: an array again, as it
    # was bound (and as `bind`'s annotation says).
    vector = jtu.tree_map(
        lambda x: _concrete_array(x) if isinstance(x, np.ndarray) else x, vector
    )
    solution, result, stats = bind(
        operator, state, vector, options, solver, throw, kind
    )
    dependent_rows, dependent_columns = rank_flags(solver, operator)
    y0, t_y0 = _initial_guess(solver, operator, options, t_options, dependent_columns)
    has_vector_tangent = len(jtu.tree_leaves(t_vector)) > 0
    has_operator_tangent = len(jtu.tree_leaves(t_operator)) > 0
    if not (has_vector_tangent or has_operator_tangent or t_y0 is not None):
        return (solution, result, stats), (
            _nones(solution),
            _nones(result),
            _nones(stats),
        )

    # Derivative of the pseudoinverse solution x = A^+ b along (V, v) (Golub and
    # Pereyra, 1973; section 4.1 of the lineax paper), with x = A^+ b and
    # z = V^H (A^+)^H x:
    #   (1) dx = A^+ (v - V x + (A^+)^H V^H (b - A x) - A z) + z
    # If A has independent columns, A^+ A = I and the z-terms cancel: eq (2).
    # If A has independent rows, b - A x = 0 and that term vanishes: eq (3).
    # If both, A^+ = A^{-1}: eq (4), dx = A^{-1} (v - V x).
    # For complex A every transpose is the conjugate transpose.
    #
    # With an initial guess y0 that the answer depends on, x = y0 + A^+ b' with
    # b' = b - A y0 (see `_initial_guess`). Applying (1) to x' = x - y0 = A^+ b',
    # whose vector tangent is v' = v - V y0 - A dy0, gives dx = dx' + dy0; as
    # V y0 + V x' = V x and b' - A x' = b - A x, the only changes to (1) are
    # z = V^H (A^+)^H (x - y0) and the terms in dy0 (together (I - A^+ A) dy0).
    complex_ = tree_is_complex(operator.in_structure(), operator.out_structure())
    # `A` in (1) is the operator as the solver solves it (`solved_operator`), as `V`
    # is the part of the tangent it reads: `Diagonal(well_posed=False)` of a
    # matrix tagged diagonal reads its diagonal alone, and with the whole matrix
    # here its JVP was wrong along every tangent where the matrix had entries
    # off the diagonal.
    solved = (
        solver.solved_operator(operator)
        if dependent_rows or dependent_columns
        else operator
    )
    # The tangent solves start from zero: they solve for derivatives, not for the
    # answer `y0` approximates.
    options = {key: value for key, value in options.items() if key != "y0"}
    terms = []
    after = []
    if has_vector_tangent:
        terms.append(_as_tangent(vector, t_vector))
    if t_y0 is not None:
        terms.append(_tree_neg(solved.mv(t_y0)))
        after.append(t_y0)
    if has_operator_tangent:
        # (Only the part of the tangent that the solver reads changes the solution.)
        tangent_op = solver.part_read(
            operator, TangentLinearOperator(operator, t_operator)
        )
        terms.append(_tree_neg(tangent_op.mv(solution)))

        # Transposed once, shared by equation (1)'s two uses.
        tangent_op_t = (
            tangent_op.transpose() if dependent_rows or dependent_columns else None
        )

        def tangent_op_h_mv(y):
            # V^H y = conj(V^T conj(y)).
            assert tangent_op_t is not None
            return tree_conj(tangent_op_t.mv(tree_conj(y, complex_)), complex_)

        # (Where the solver's factorisation says the operator has full rank: see
        # `has_full_rank`.)
        full_rank = solver.has_full_rank(state)
        if dependent_rows:
            residual = _tree_sub(vector, solved.mv(solution))
            if full_rank is not None and operator.out_size() < operator.in_size():
                # Wide, of full row rank: every `b` is in the range, `b - A x = 0`.
                residual = _tree_zero_where(full_rank, residual)
            terms.append(
                _conj_transpose_solve(
                    operator,
                    state,
                    tangent_op_h_mv(residual),
                    options,
                    solver,
                    throw,
                    complex_,
                )
            )
        if dependent_columns:
            row_part = solution if y0 is None else _tree_sub(solution, y0)
            y = _conj_transpose_solve(
                operator, state, row_part, options, solver, throw, complex_
            )
            z = tangent_op_h_mv(y)
            if full_rank is not None and operator.in_size() < operator.out_size():
                # Tall, of full column rank: no null space, `(I - A^+ A) z = 0`.
                z = _tree_zero_where(full_rank, z)
            terms.append(_tree_neg(solved.mv(z)))
            after.append(z)
    total = _tree_add(*terms) if len(terms) > 1 else terms[0]
    t_solution = bind(operator, state, total, options, solver, throw, "tangent")[0]
    if after:
        t_solution = _tree_add(t_solution, *after)
    return (solution, result, stats), (t_solution, _nones(result), _nones(stats))


def _tree_zero_where(pred: Array, tree: Any) -> Any:
    return jtu.tree_map(lambda x: select(pred, 0, x), tree)


def _is_undefined(x: Any) -> bool:
    return isinstance(x, ad.UndefinedPrimal)


def _cotangent_like(ct: Any, primal: Any) -> Any:
    """`ct` in the dtype of the (undefined) primal leaf it is the cotangent of; a
    real leaf's cotangent is the real part (the transpose of a real input's
    inclusion into the complex numbers)."""
    if ct is None:
        return None
    dtype = primal.aval.dtype if _is_undefined(primal) else jnp.result_type(primal)
    if ct.dtype == dtype:
        return ct
    return cast_keeping_real(ct, dtype)


def _linear_solve_transpose(inputs, cts_out):
    operator, state, vector, options, solver, throw, kind, _ = inputs
    del kind
    for name, value in (("operator", operator), ("state", state), ("options", options)):
        if any(isinstance(x, ad.UndefinedPrimal) for x in jtu.tree_leaves(value)):
            raise NotImplementedError(
                f"`linear_solve` is not linear in its `{name}`, so cannot be "
                "transposed with respect to it. (This is a bug: please report it.)"
            )
    ct_solution, _, _ = cts_out
    # The solve x = A^+ b is linear in b; its transpose is b_bar = (A^+)^T x_bar =
    # (A^T)^+ x_bar, a solve with the transposed operator from the same state.
    state_t, options_t = solver.transpose(state, options)
    ct_vector = bind(
        _transposed(operator),
        state_t,
        ct_solution,
        options_t,
        solver,
        throw,
        "cotangent",
    )[0]
    # The solve computes in the operator's common dtype, so a vector leaf of
    # another dtype (a float32 row of a PyTree operator with float64 blocks) gets a
    # cotangent of that dtype: give each leaf its own (JAX does not check).
    ct_vector = jtu.tree_map(_cotangent_like, ct_vector, vector, is_leaf=_is_undefined)
    return (
        _nones(operator),
        _nones(state),
        ct_vector,
        _nones(options),
        _nones(solver),
        None,
        None,
        None,
    )


_filter_transpose = eqxi.filter_primitive_transpose(materialise_zeros=True)(  # pyright: ignore[reportCallIssue]
    _linear_solve_transpose
)


def _transpose_rule(cts_out, *dynamic, **params):
    # JAX may hand back a known scalar input as a Python-scalar literal
    # (`TypedFloat`, e.g. a differentiated Python float that became a constant of
    # the linear jaxpr); `filter_primitive_transpose` would count it as static
    # data, not as the array it was bound as. Make it an array again.
    dynamic = [
        _concrete_array(x)
        if isinstance(x, (int, float, complex)) and not isinstance(x, bool)
        else x
        for x in dynamic
    ]
    return _filter_transpose(cts_out, *dynamic, **params)


# Batching comes from `create_vprim`: `vmap` of the primitive binds a batched
# version whose rules are the `vmap`s of these rules, so JVPs and transposes of
# batched solves are themselves batched solves. Under `vmap` over the vector only,
# the solver's own batching makes one matrix solve of many right-hand sides.
# (`filter_primitive_transpose`'s overloads confuse pyright: it is called with the
# rule, as documented.)
linear_solve_p = eqxi.create_vprim(
    "linear_solve",
    eqxi.filter_primitive_def(_linear_solve_impl),
    eqxi.filter_primitive_def(_linear_solve_abstract_eval),
    eqxi.filter_primitive_jvp(_linear_solve_jvp),
    _transpose_rule,
)


# JAX defines no transpose rule for `stop_gradient`, and yet reverse mode can meet
# one in a linear function: batching a `lax.cond` with a batched predicate turns
# it into a `select` between the branches, each branch's inputs wrapped in
# `stop_gradient` for the elements that do not take it (JAX's cond batching rule;
# JAX issue #1052). When the `cond` is in a JVP rule that is itself batched --
# Optimistix's implicit-function-theorem JVP, which calls `linear_solve` on a
# tangent, under `jax.grad(jax.vmap(...))`, as Diffrax's events do -- those
# `stop_gradient`s apply to tangents, and transposing the JVP fails.
# `stop_gradient` means that no derivative flows through it, which is what its own
# JVP (a zero tangent) says; the matching transpose is a zero cotangent. (Only the
# elements whose branch output is discarded anyway go through it, so this is also
# the transpose of the select as a whole, minus any NaN from the untaken branch.)
# This is JAX-global, so it is registered only where JAX has no rule of its own.
def _stop_gradient_transpose(ct, x):
    del ct, x
    return [None]


if lax.stop_gradient_p not in ad.primitive_transposes:
    ad.primitive_transposes[lax.stop_gradient_p] = _stop_gradient_transpose


# Dead-code elimination. A caller that uses only `Solution.value` leaves the
# statistics unused (for the direct solvers, a condition estimate made of a
# dozen triangular solves), and this primitive is opaque to JAX's dead-code
# elimination: its implementation would be lowered whole, and only XLA would
# remove the unused part, after lowering and parsing it. So when `jax.jit` (or
# any other user of `pe.dce_jaxpr`) finds the statistics of a solve unused, it
# keeps the primitive (JVP, transpose and batching still apply) but with
# `with_stats=False`, whose implementation leaves them out.
#
# Under `vmap` the solve is Equinox's batched primitive (`vprim`, holding this
# one's parameters), which needs the same rule: without it every batched solve
# (the tangent and cotangent solves of `vmap(jax.grad(...))` included, whose
# statistics nothing can read) computed its statistics, and XLA did not remove
# them all. A batched Krylov solve carried a batch x max_steps residual history
# through its loops, every member's history selected whole at every step.
def _dce_rule(used_outputs: list[bool], *args: Any) -> tuple[list[bool], Any]:
    # (JAX calls a rule with `(used_outputs, eqn)` up to 0.11 and with
    # `(used_outputs, live_ins, eqn)` from 0.12, which `jax>=0.10.2` installs on
    # Python 3.12 and later: there every solve failed, "_dce_rule() takes 2
    # positional arguments but 3 were given".)
    eqn = args[-1]
    params = _solve_params(eqn.primitive, eqn.params)
    if params is None:
        # Another Equinox `vprim`: JAX's default rule.
        if not any(used_outputs) and not _has_effects(eqn, *args[:-1]):
            return [False] * len(eqn.invars), None
        return [True] * len(eqn.invars), eqn
    if not any(used_outputs):
        return [False] * len(eqn.invars), None
    used_inputs = [True] * len(eqn.invars)
    static = params["static"]
    treedef_out, _ = params["flatten"].get()
    solution_def, result_def, _ = treedef_out.children()
    n_kept = solution_def.num_leaves + result_def.num_leaves
    # `with_stats` is the last argument of `bind`, so the last static leaf.
    if static[-1] is not True or any(used_outputs[n_kept:]):
        return used_inputs, eqn
    new_eqn = jex_core.new_jaxpr_eqn(
        eqn.invars,
        eqn.outvars,
        eqn.primitive,
        _stats_free_params(eqn.primitive, eqn.params),
        eqn.effects,
        eqn.source_info,
        eqn.ctx,
    )
    return used_inputs, new_eqn


def _has_effects(eqn: Any, *live_ins: Any) -> bool:
    """Whether `eqn` has effects that keep it: JAX's own test where it has one
    (an effect that JAX's dead-code elimination may drop, a named axis or a
    read, does not count; from 0.12, nor does a reference whose input is not
    live), else any effect. (JAX's is not public API: looked up in the public
    `jax.interpreters.partial_eval`, which has never exported it, every
    effect kept the equation, on every version.)"""
    if _jax_has_effects is not None:
        try:
            return bool(_jax_has_effects(eqn, *live_ins))
        except TypeError:  # pragma: no cover - another signature
            pass
    return bool(eqn.effects)


_jax_has_effects: Any = getattr(
    _private_module("jax._src.interpreters.partial_eval"), "has_effects", None
)


def _solve_params(primitive: Any, params: dict) -> dict | None:
    """The parameters of the `linear_solve_p` that `primitive` binds, itself or
    batched (a `vprim`, under each `vmap`); `None` for any other primitive."""
    if primitive is linear_solve_p:
        return params
    if primitive is _vprim_p:
        return _solve_params(params["prim"], dict(params["params"]))
    return None


def _stats_free_params(primitive: Any, params: dict) -> dict:
    if primitive is linear_solve_p:
        return dict(params, static=params["static"][:-1] + (False,))
    inner = _stats_free_params(params["prim"], dict(params["params"]))
    return dict(params, params=tuple(inner.items()))


@dataclasses.dataclass
class _Traced:
    """A trace of `solver.compute`: its jaxpr, and that jaxpr less what only the
    statistics need (made when first asked for)."""

    jaxpr: Any  # a ClosedJaxpr
    out_struct: Any
    out_static: Any
    without_stats: Any = None  # (Jaxpr, consts)

    def stats_free(self) -> tuple[Any, Any]:
        if self.without_stats is None:
            closed = self.jaxpr
            n_kept = len(jtu.tree_leaves(self.out_struct[:2]))
            n_out = len(closed.jaxpr.outvars)
            used = [True] * n_kept + [False] * (n_out - n_kept)
            jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, used, instantiate=True)
            self.without_stats = (jaxpr, closed.consts)
        return self.without_stats


def _lowering_mesh():
    """The abstract mesh JAX lowers in, where none is set: the empty one. (Tracing
    reads either as no mesh, see `_trace_context`, but JAX's caches of traced
    functions tell them apart: a `jnp` function traced in `compute` both at the
    abstract evaluation of one solve and at the lowering of another would be
    lowered twice.)"""
    if _empty_abstract_mesh is None or jax.sharding.get_abstract_mesh() != (
        _empty_abstract_mesh
    ):
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(_empty_abstract_mesh)


def _traced_compute(solver, args, key) -> _Traced:
    """`solver.compute` traced at `args` (whose arrays are `jax.ShapeDtypeStruct`s
    with their weak types), once per `key` (see `_abstract_eval_key`): the
    abstract evaluation's trace is the one the lowering evaluates, so that a new
    function of a solve (a new closure, a new `jit`) traces the solver once, not
    twice (CG on a 64 x 64 stencil: lowering 39 -> 24 ms)."""
    cached = None if key is None else _TRACES.get(key)  # (see the abstract eval)
    if cached is not None:
        return cached
    with _lowering_mesh():
        closed, out_struct, out_static = eqx.filter_make_jaxpr(solver.compute)(*args)
    _check_compute_output(solver, eqx.combine(out_struct, out_static))
    out_struct = jtu.tree_map(_with_mesh_sharding, out_struct)
    traced = _Traced(closed, out_struct, out_static)
    # Only constants made by `compute` itself (never a tracer of the trace being
    # built) may be kept beyond this trace.
    if not any(isinstance(c, jax.core.Tracer) for c in closed.consts):
        _TRACES.put(key, traced)
    return traced


def _check_compute_output(solver, out: Any) -> None:
    """Raise a TypeError naming a user's solver class unless its `compute`
    returned `(solution, result, stats)` with `result` a `lx.RESULTS` item. (A
    bare boolean or integer code failed inside the solve, with "'bool' object has
    no attribute '_value'".)"""
    if isinstance(out, tuple) and len(out) == 3 and isinstance(out[1], RESULTS):
        return
    name = type(solver).__name__
    got = f"a {type(out).__name__}" if not isinstance(out, tuple) else None
    if got is None:
        got = f"a tuple of {len(out)}"
        if len(out) == 3:
            array = isinstance(out[1], jax.ShapeDtypeStruct)  # (as traced)
            kind = "an array" if array else f"a {type(out[1]).__name__}"
            got += f" whose `result` is {kind}"
    raise TypeError(
        f"`{name}.compute` must return `(solution, result, stats)`, with `result` "
        "an item of `lx.RESULTS` (e.g. `lx.RESULTS.successful`, or "
        f"`lx.RESULTS.where(ok, lx.RESULTS.successful, lx.RESULTS.singular)`); got "
        f"{got}."
    )


def _compute_traced(solver, state, vector, options, with_stats: bool):
    """`solver.compute(state, vector, options)`, evaluated from its trace (see
    `_traced_compute`); without `with_stats`, with its statistics left out of the
    computation (and returned as zeros)."""
    structs = jtu.tree_map(_to_struct, (state, vector, options))
    key = _abstract_eval_key(solver, structs)
    traced = _traced_compute(solver, structs, key)
    args = [x for x in jtu.tree_leaves((state, vector, options)) if eqx.is_array(x)]
    if with_stats:
        out = jax.core.eval_jaxpr(traced.jaxpr.jaxpr, traced.jaxpr.consts, *args)
    else:
        computed = traced
        if any(isinstance(x, _BatchTracer) for x in args):
            # Under `vmap` (this is the batched primitive's implementation), a
            # statistic carried through a loop costs every step a select over
            # the whole batch of it, and neither JAX's dead-code elimination (of
            # a `while_loop`'s carry) nor XLA's removes it: CG's residual
            # history (batch x up to 10^4 entries) made `vmap(jax.grad(...))` of
            # 300 CG solves with a tridiagonal operator, n = 1000, 5.6x slower.
            # So `compute` is traced once more without such statistics (see
            # `statistics_unused`); those it returns are zeros, as here.
            # (Unbatched, a loop writes its history in place: not retraced.)
            with statistics_unused():
                computed = _traced_compute(
                    solver, structs, None if key is None else (*key, "stats-free")
                )
        jaxpr, consts = computed.stats_free()
        kept = jax.core.eval_jaxpr(jaxpr, consts, *args)
        stats = jtu.tree_leaves(traced.out_struct[2])
        out = list(kept) + [jnp.zeros(s.shape, s.dtype) for s in stats]
    # An output that is a literal of the jaxpr comes back as the Python or NumPy
    # scalar it holds: an array again, as `compute` returned it, and a concrete
    # one, not a constant of the trace (a concrete result code is tested on the
    # host, see `_is_successful`).
    structs = jtu.tree_leaves(traced.out_struct)
    out = [
        x if isinstance(x, jax.Array) else _concrete_array(np.asarray(x, s.dtype))
        for x, s in zip(out, structs)
    ]
    out = jtu.tree_unflatten(jtu.tree_structure(traced.out_struct), out)
    return eqx.combine(out, traced.out_static)


pe.dce_rules[linear_solve_p] = _dce_rule
if _vprim_p is not None and _vprim_p not in pe.dce_rules:
    pe.dce_rules[_vprim_p] = _dce_rule


# Lowering. JAX lowers a primitive by tracing its implementation anew in every
# lowering (`mlir.lower_fun`): for a dense solve, the checks, the error branch and
# the replay of `compute`, about a quarter of the lowering's Python time, every
# time a new function containing the solve is compiled. The implementation's
# trace depends only on the parameters (the inputs' structure and static data),
# the input avals and the trace context, so it is kept under those, as the
# abstract evaluation is (`_ABSTRACT_EVALS`), and only its lowering to StableHLO
# is done each time.
_IMPL_TRACES = _TraceCache()
_impl_rule = eqxi.filter_primitive_def(_linear_solve_impl)


# Not public API (see `_private_tracer`): else JAX's `lower_fun`, as Equinox
# registers it.
_api_util: Any = _private_module("jax._src.api_util")
_flattree: Any = _private_module("jax._src.flattree")
_lu: Any = _private_module("jax._src.linear_util")
_mlir: Any = _private_module("jax._src.interpreters.mlir")
_pe: Any = _private_module("jax._src.interpreters.partial_eval")
_xc: Any = getattr(_private_module("jax._src.lib"), "xla_client", None)
_MutableEffect: Any = getattr(
    _private_module("jax._src.core"), "InternalMutableArrayEffect", ()
)


def _impl_trace_key(avals_in, params) -> tuple | None:
    key = (
        params["treedef"],
        tuple((type(x), x) for x in params["static"]),
        tuple(avals_in),
        _trace_context(),
        statistics_wanted(),
    )
    try:
        hash(key)
    except TypeError:  # unhashable static data
        return None
    return key


# The implementation traced as this JAX's own `mlir.lower_fun` traces a rule, into
# a jaxpr and the values of its `constvars` (see `_private_tracer`). JAX 0.10's
# `trace_to_jaxpr_dynamic` returns the two apart. JAX 0.11 made a jaxpr carry
# its constants (`Jaxpr.consts`; `ClosedJaxpr` became an alias of `Jaxpr`), and
# a jaxpr's `constvars` are the inputs with a constant attached: that function
# still returns the constants apart, with none attached, so the jaxpr had no
# `constvars` for them, and every solve fell back to `lower_fun` (see
# `_linear_solve_lowering`), which traces with `trace_to_jaxpr(...,
# requires_low=True)` and reads `jaxpr.consts`, as `_trace_with_consts` does.
# Its StableHLO is `lower_fun`'s (`test_lowering_falls_back_where_...`).
# (Uncached there, `trace_to_jaxpr_nocache`: `trace_to_jaxpr` is cached on the
# function, a new `partial` of the implementation at every lowering.)
def _trace_dynamic(args, avals_in, params) -> tuple[Any, Any]:
    wrapped = _lu.wrap_init(
        _impl_rule,
        params,
        debug_info=_api_util.debug_info("linear_solve", _impl_rule, args, {}),
    )
    jaxpr, _, consts = _pe.trace_to_jaxpr_dynamic(wrapped, avals_in, lower=True)
    return jaxpr, consts


def _trace_with_consts(args, avals_in, params) -> tuple[Any, Any]:
    jaxpr, _ = _pe.trace_to_jaxpr_nocache(
        ft.partial(_impl_rule, **params),
        _flattree.flatten_args(*avals_in),
        _api_util.debug_info("linear_solve", _impl_rule, args, {}),
        requires_low=True,
    )
    return jaxpr, jaxpr.consts


def _linear_solve_lowering(ctx, *args, **params):
    key = _impl_trace_key(ctx.avals_in, params)
    try:
        traced = None if key is None else _IMPL_TRACES.get(key)
    except Exception:  # noqa: BLE001 - static data whose `==` is not a bool
        key = traced = None
    if traced is None:
        try:
            jaxpr, consts = _trace_impl(args, ctx.avals_in, params)
        except ShardingTypeError as error:
            # (An iterative solver's loop is first traced here, at the
            # abstract values' shardings.)
            note_explicit_axes(error, ctx.avals_in)
            raise
        if len(consts) != len(jaxpr.constvars) or any(
            isinstance(e, _MutableEffect) for e in jaxpr.effects
        ):
            # JAX's own rule, uncached: for an effect that no solver here makes;
            # and where the trace's constants are not the values of
            # `jaxpr.constvars`, as with `_trace_dynamic` on jax 0.11 and 0.12,
            # where every solve, jitted or not, failed to lower ("safe_zip()
            # argument 1 has length 0 but argument 0 has length 1", jax 0.11.2)
            # before `_trace_with_consts` was used there: a JAX changing this
            # again is lowered, slower (the implementation traced twice), rather
            # than failed.
            lowering = _mlir.lower_fun(_impl_rule, multiple_results=True)
            return lowering(ctx, *args, **params)
        traced = (jaxpr, consts)
        # Only constants made by the implementation (never a tracer of an
        # enclosing trace) may be kept beyond this lowering.
        if not any(isinstance(c, jax.core.Tracer) for c in consts):
            _IMPL_TRACES.put(key, traced)
    jaxpr, consts = traced
    if ctx.platforms is not None:
        module_context = ctx.module_context.replace(platforms=ctx.platforms)
    else:
        module_context = ctx.module_context
    out, tokens = _mlir.jaxpr_subcomp(
        module_context,
        jaxpr,
        ctx.name_stack,
        ctx.tokens_in,
        _mlir.ir_consts(consts, [v.aval for v in jaxpr.constvars]),
        *args,
        dim_var_values=ctx.dim_var_values,
        const_lowering=ctx.const_lowering,
        outer_traceback=_xc.Traceback(),
    )
    ctx.set_tokens_out(tokens)
    return out


def _private_tracer() -> Any:
    """How `_linear_solve_lowering` traces the implementation with this JAX:
    `_trace_with_consts` (jax 0.11, 0.12) or `_trace_dynamic` (jax 0.10), where
    the private functions and fields it uses have the signatures it was written
    against; else `None`. Checked once, at import: with another JAX the primitive
    keeps Equinox's lowering (JAX's `lower_fun`: slower to lower, never broken),
    rather than every solve failing to lower.
    `test_solve_implementation_traced_once_per_lowering_key` fails where the
    check does, so that the fallback is seen."""
    if any(m is None for m in (_api_util, _lu, _mlir, _pe, _xc)):
        return None
    try:
        subcomp = inspect.signature(_mlir.jaxpr_subcomp).parameters
        fields = {f.name for f in dataclasses.fields(_mlir.LoweringRuleContext)}
    except (AttributeError, TypeError, ValueError):
        return None
    lowers = (
        list(subcomp)[:5]
        == ["ctx", "jaxpr", "name_stack", "tokens", "consts_for_constvars"]
        and {"dim_var_values", "const_lowering", "outer_traceback"} <= set(subcomp)
        and callable(getattr(_mlir, "ir_consts", None))
        and callable(getattr(_api_util, "debug_info", None))
        and {
            "module_context",
            "name_stack",
            "avals_in",
            "tokens_in",
            "const_lowering",
            "dim_var_values",
            "platforms",
        }
        <= fields
    )
    if not lowers:
        return None
    # (jax 0.11 and later: a jaxpr carrying its constants.)
    jaxpr_type = getattr(_private_module("jax._src.core"), "Jaxpr", None)
    try:
        trace = inspect.signature(_pe.trace_to_jaxpr_nocache).parameters
    except (AttributeError, TypeError, ValueError):
        trace = {}
    if (
        list(trace)[:3] == ["fun", "in_avals", "debug_info"]
        and "requires_low" in trace
        and callable(getattr(_flattree, "flatten_args", None))
        and isinstance(getattr(jaxpr_type, "consts", None), property)
        and isinstance(getattr(jaxpr_type, "constvars", None), property)
    ):
        return _trace_with_consts
    # (jax 0.10: the jaxpr and its constants apart.)
    try:
        trace = inspect.signature(_pe.trace_to_jaxpr_dynamic).parameters
        wrap = inspect.signature(_lu.wrap_init).parameters
    except (AttributeError, TypeError, ValueError):
        return None
    if "lower" in trace and "debug_info" in wrap:
        return _trace_dynamic
    return None


_trace_impl: Any = _private_tracer()
if _trace_impl is not None:
    _mlir.register_lowering(linear_solve_p, _linear_solve_lowering)
    _register_private_cache(_IMPL_TRACES, "lineax traces of the implementation")
