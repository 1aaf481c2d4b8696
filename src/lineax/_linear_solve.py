"""`linear_solve` and `invert`: argument checks, then a bind of the primitive."""

import dataclasses
import functools
import threading
import time
import types
import weakref
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.extend.core
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree

from ._errors import EQX_ON_ERROR
from ._misc import (
    cast_keeping_real,
    default_floating_dtype,
    describe,
    device_copy,
    EVAL_TRACE,
    HeldArrays,
    instance_dict,
    is_inexact_array,
    no_active_trace,
    note_explicit_axes,
    ShardingTypeError,
    staging,
    strip_weak_dtype,
    TOP_AXES,
    TRACE,
    TRACE_AXES,
)
from ._operator.base import (
    AbstractLinearOperator,
    FLAT_FIELDS,
    has_no_precision,
    is_cacheable,
    PYTHON_NUMBERS,
    reads_every_leaf,
    STATE_SIGNATURES,
)
from ._operator.function import FunctionLinearOperator, reads_globals, retraced
from ._operator.realified import (
    joined,
    mixes_real_and_complex,
    realified,
    realified_options,
    realified_vector,
)
from ._primitive import bind, host_result_code, primal_failure_message
from ._solution import pending_solution, Solution, solution_of
from ._solver.auto import AutoLinearSolver, AutoState, tagged_choices
from ._solver.base import (
    AbstractLinearSolver,
    check_solver,
    declared_option_keys,
    inverse_tags,
)


_sentinel: Any = eqx.internal.doc_repr(object(), "sentinel")


def _stop_gradient_leaf(x: Any) -> Any:
    if not eqx.is_array(x):
        return x
    out = lax.stop_gradient(x)
    if isinstance(out, jax.Array):
        return out
    # Under `jax.grad` of a function of a Python float, `stop_gradient` returns the
    # primal, a constant, as a `float` subclass (`TypedFloat`) rather than an
    # array; of a NumPy array, as a NumPy array (`TypedNdArray`), which `init`'s
    # annotations refuse. Keep it a JAX array, as it was. (Made eagerly, not as a
    # new value of the trace being built.)
    with jax.core.eval_context():
        if isinstance(out, np.ndarray):
            return jax.device_put(out)
        return jnp.asarray(out)


def _stop_gradient(tree: PyTree) -> PyTree:
    return jtu.tree_map(_stop_gradient_leaf, tree)


def _structure_in_words(tree: PyTree, treedef: Any) -> str:
    """What a vector or a structure is, for an error message: "one array,
    float32[3]", "a list of 3 leaves (PyTreeDef([*, *, *]))"."""
    if jtu.treedef_is_leaf(treedef):
        if isinstance(tree, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)):
            return f"one array, {describe(tree)}"
        return f"one {type(tree).__name__}"
    n = treedef.num_leaves
    leaves = "leaf" if n == 1 else "leaves"
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jtu.tree_leaves(tree)):
        return f"a {type(tree).__name__} of {n} {leaves}, {describe(tree)}"
    return f"a {type(tree).__name__} of {n} {leaves} ({treedef})"


def _check_vector(
    operator: AbstractLinearOperator,
    out_struct: PyTree[jax.ShapeDtypeStruct],
    vector: PyTree,
) -> PyTree[Array]:
    """Check `vector` against the operator's output structure `out_struct`,
    converting integer arrays and safely promotable dtypes to the operator's
    dtypes."""
    out_leaves, out_treedef = jtu.tree_flatten(out_struct)
    # (Through the class: a bound method of a module is a new module each time.)
    in_struct = type(operator).in_structure(operator)
    if not out_leaves or not jtu.tree_leaves(in_struct):
        raise ValueError(
            "The operator's input and output structures must each have at least "
            f"one array, but it maps {describe(in_struct)} to "
            f"{describe(out_struct)}: there is nothing to solve for."
        )
    vec_leaves, vec_treedef = jtu.tree_flatten(vector)
    _check_enabled_dtypes(in_struct, out_leaves, vec_leaves)
    _check_inexact(in_struct, out_struct)
    if out_treedef != vec_treedef:
        hint = ""
        if jtu.treedef_is_leaf(out_treedef) and isinstance(vector, (list, tuple)):
            # The everyday slip: a Python list of numbers for a vector. Its
            # elements are leaves of a PyTree, not entries of an array.
            hint = (
                f" A Python {type(vector).__name__} is a PyTree of separate "
                "leaves, not an array: pass `jnp.asarray(vector)`."
            )
        raise ValueError(
            "`vector` must have the PyTree structure of `operator.out_structure()`: "
            f"expected {_structure_in_words(out_struct, out_treedef)}, got "
            f"{_structure_in_words(vector, vec_treedef)}.{hint}"
        )
    new_leaves = []
    for i, (leaf, struct) in enumerate(zip(vec_leaves, out_leaves)):
        where = "`vector`" if len(vec_leaves) == 1 else f"leaf {i} of `vector`"
        if not eqx.is_array_like(leaf) or isinstance(leaf, (str, bytes)):
            raise TypeError(f"{where} must be an array, got {type(leaf).__name__}.")
        shape = jnp.shape(leaf)
        if shape != struct.shape:
            raise ValueError(
                f"{where} has shape {shape}, but the operator's output has shape "
                f"{struct.shape} (the operator maps {describe(in_struct)}"
                f" to {describe(out_struct)})."
            )
        dtype = jnp.result_type(leaf)
        target = struct.dtype
        if not jnp.issubdtype(dtype, jnp.inexact):
            leaf = jnp.asarray(leaf, target)
        elif dtype != target:
            if jnp.issubdtype(dtype, jnp.complexfloating) and not jnp.issubdtype(
                target, jnp.complexfloating
            ):
                raise ValueError(
                    f"{where} is complex ({dtype}) but the operator is real "
                    f"({target}); the solution would have to be complex. Make the "
                    "operator complex (e.g. `lx.MatrixLinearOperator(A.astype("
                    "jnp.complex128))`) or solve for the real and imaginary parts "
                    "separately."
                )
            # ("Converting would lose precision" refused `1.0` for a float32
            # scalar operator.)
            if not has_no_precision(leaf) and not np.can_cast(
                dtype, target, casting="safe"
            ):
                raise ValueError(
                    f"{where} has dtype {dtype} but the operator has dtype {target}; "
                    "converting would lose precision. Cast one of them explicitly "
                    f"(e.g. `vector.astype(jnp.{jnp.dtype(target).name})`)."
                )
            leaf = jnp.asarray(leaf).astype(target)
        else:
            leaf = jnp.asarray(leaf)
        new_leaves.append(leaf)
    return jtu.tree_unflatten(vec_treedef, new_leaves)


def _check_inexact(
    in_struct: PyTree[jax.ShapeDtypeStruct], out_struct: PyTree[jax.ShapeDtypeStruct]
) -> None:
    """Raise a TypeError naming the operator where its input or output structure
    has an integer or boolean dtype. The operators convert integer arrays to the
    default floating dtype when they are built, but not arrays put in later (by
    `eqx.tree_at`, `jax.tree.map`, unflattening), nor a user's operator class
    declaring integer structures: `lx.QR()`, `lx.SVD()` and `lx.Cholesky()`
    solved such a matrix in its integer dtype, silently truncated (`[0, 0]` for
    the solution `[0.2, 0.4]`), and the other solvers failed deep in JAX ("lu
    does not accept dtype int64", "data type <class 'numpy.int64'> not
    inexact"); the vector's check asked for a float vector to be cast to the
    integer dtype."""
    for leaf in jtu.tree_leaves((in_struct, out_struct)):
        # (`kind`: bfloat16 is not a NumPy floating type, but it is not "biu".)
        if jnp.dtype(leaf.dtype).kind in "biu":
            floating = jnp.dtype(default_floating_dtype()).name
            raise TypeError(
                "A linear solve needs floating or complex dtypes, but the "
                f"operator maps {describe(in_struct)} to {describe(out_struct)}. "
                "Operators convert integer and boolean arrays when they are "
                "built (`lx.MatrixLinearOperator(matrix)`); this one's were put "
                "in afterwards (e.g. by `eqx.tree_at` or `jax.tree.map`), or its "
                "class declares such structures: give it floating arrays (e.g. "
                f"`matrix.astype(jnp.{floating})`)."
            )


def _check_enabled_dtypes(*trees: PyTree) -> None:
    """Raise a ValueError where an array or structure has a dtype that JAX's
    configuration no longer allows: 64-bit arrays made with `jax_enable_x64` on,
    solved after it was turned off. (The solve failed inside, with an internal
    `TypeError` or an MLIR verifier error; JAX's own functions still take such
    arrays, so they are not refused before.)"""
    for leaf in jtu.tree_leaves(trees):
        # (Not NumPy arrays or Python numbers: those are converted, as in JAX.)
        if not isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
            continue
        dtype = leaf.dtype
        if jax.dtypes.canonicalize_dtype(dtype) != dtype:
            raise ValueError(
                f"The solve holds an array of dtype {jnp.dtype(dtype).name}, which "
                "JAX does not allow while `jax_enable_x64` is off (it was made "
                "with x64 on). Turn it on again "
                '(`jax.config.update("jax_enable_x64", True)`) or convert the '
                f"operator and the vector to "
                f"{jnp.dtype(jax.dtypes.canonicalize_dtype(dtype)).name}."
            )


def _check_throw(throw: Any) -> None:
    if not isinstance(throw, bool):
        raise TypeError(f"`throw` must be a bool, got {type(throw).__name__}.")


def _check_options(options: Any, solver: AbstractLinearSolver) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(
            f"`options` must be a dict or None, got {type(options).__name__}."
        )
    # See `AbstractLinearSolver.option_keys`: a solver that declares its keys gets
    # a key that no solver reads refused (a typo); one that does not, anything.
    reads = solver.option_keys
    if reads is None:
        return options
    known = declared_option_keys()
    unknown = set(options) - known
    if unknown:
        name = type(solver).__name__
        # (By `repr`: keys of mixed types, `{"precond": p, 1: q}`, do not sort,
        # and raised "'<' not supported between instances of 'int' and 'str'".)
        keys = ", ".join(sorted(map(repr, unknown)))
        raise ValueError(
            f"Unknown key(s) [{keys}] in `options`: no solver reads "
            f"{'them' if len(unknown) > 1 else 'it'}. `lx.{name}` reads "
            f"{sorted(reads) if reads else 'no options'}; the keys that solvers read "
            f"are {sorted(known)} (see each solver's docs for which it uses)."
        )
    return options


_STATE_MISMATCH = (
    "`state` does not match `solver.init(operator, options)`: pass the state "
    "returned by `solver.init` (or `Solution.state`) for this same solver and "
    "an operator of the same structure, shapes and dtypes."
)


def _check_state(state, operator, options, solver, mismatch=_STATE_MISMATCH):
    if isinstance(solver, AutoLinearSolver) and isinstance(state, AutoState):
        # The state's solver is used, as chosen when the state was made. Tags can
        # differ without the operator changing (`2.0 * op` is positive definite
        # when `op` is; `t * op` with `t` traced by `jax.grad` is not known to
        # be), so the state is checked against the solver it holds, on the
        # operator with any of the tags that solver may have been chosen for.
        got = _state_signature(eqx.filter(state.state, _is_signature_leaf))
        checked = False
        chosen = False
        # The state's solver must be one that `solver` chooses, for some tags:
        # the JVP takes its rank assumptions (which of the paper's equations
        # (1)-(4)) from `solver`'s choice, so the SVD state of
        # `AutoLinearSolver(well_posed=False)` solved by `well_posed=True`
        # (LU: full rank) gave a silently wrong derivative at a rank-deficient
        # operator, from a pseudoinverse primal that raised nothing. (Lazily,
        # the untagged operator first: usually a match, after one choice.)
        for tagged, choice in tagged_choices(solver, operator):
            # (`tree_equal` returns an array where the solvers hold arrays: no
            # conclusion then, and the state is not refused for it.)
            if eqx.tree_equal(choice, state.solver) is False:
                continue
            chosen = True
            want = _expected_state(tagged, options, state.solver)
            if want == got or _is_transposed_state(got, tagged, options, state.solver):
                return
            checked = checked or want is not None
        if not chosen:
            raise ValueError(
                f"`state` was made by `lx.{state.solver!r}` (the choice of "
                "an `lx.AutoLinearSolver`), which "
                f"`lx.AutoLinearSolver(well_posed={solver.well_posed})` does not "
                "choose for this operator: pass the state of `solver.init("
                "operator, options)` with the same `well_posed` as the solve."
            )
        if checked:  # else that solver cannot init this operator: compute says so
            raise ValueError(mismatch)
        return
    want = _expected_state(operator, options, solver)
    if want is None:
        _raise_init_error(operator, options, solver)
        return
    got = _state_signature(eqx.filter(state, _is_signature_leaf))
    if got != want and not _is_transposed_state(got, operator, options, solver):
        raise ValueError(mismatch)


def _is_transposed_state(got: tuple, operator, options, solver) -> bool:
    """Whether the state signature `got` is that of `solver.transpose` of a state
    of `operator`'s transpose: a state transposed by the solver itself is one of
    the transposed operator (lineax 0.1.1 solves with it), but its static flags
    may differ from those of `init` (`LU`'s `transposed`, `QR`'s `wide` and
    `Normal`'s `tall` for a square operator), and it was refused as "does not
    match". (Traced only where the state does not match `init`'s.)"""
    return got == _expected_state(operator, options, solver, transposed=True)


def _raise_init_error(operator, options, solver) -> None:
    """Raise the error of `solver.init(operator, options)`, where it fails with a
    `ValueError` or `TypeError`: the solver cannot solve this operator at all
    (`lx.CG` without a definiteness tag, `lx.Diagonal` without a diagonal one),
    with any state. `compute` read the given state as its own and failed on a
    missing attribute instead (`'LUState' object has no attribute 'operator'`).
    Other failures (of `init` under `eval_shape` only, say) are left to
    `compute`, with the state given."""
    try:
        eqx.filter_eval_shape(solver.init, operator, options)
    except jax.errors.JAXTypeError:
        pass  # tracing itself failed (a concrete value needed): left to `compute`
    except (ValueError, TypeError):
        raise
    except Exception:  # noqa: BLE001 - left to `compute`, as the docstring says
        pass


def _is_array_or_struct(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _is_signature_leaf(x: Any) -> bool:
    """A leaf that a state's signature counts by shape and dtype: an array, or a
    Python number, which `jit` traces as a (weakly typed) array. A Krylov
    solver's state holds its operator: that of `op * 2.0` holds the Python float
    where `init` of `op * t`, with `t` traced by `jit` or `jax.grad`, holds an
    array, and the state of one was refused for the other as "does not match"
    (lineax 0.1.1 solves with it)."""
    return _is_array_or_struct(x) or isinstance(x, (bool, int, float, complex))


def _state_signature(tree: PyTree, numbers_by_value: bool = False) -> tuple:
    """A state's PyTree structure and its leaves' shapes and dtypes (weak types
    ignored), in a form that compares with `==`.

    An operator held in a state (`HeldArrays`) counts by its arrays and Python
    numbers alone (see `_is_signature_leaf`): its other leaves, such as the
    jaxpr of a function operator, are new objects each time `init` runs
    (`Normal(CG())` transposes the function), and compare by identity, as they
    must for `jit`'s caches. With `numbers_by_value`, Python numbers outside of
    a `HeldArrays` count by value (the key of `_EXPECTED_STATES`: what `init`
    makes of an operator may depend on them)."""
    tree = jtu.tree_map(
        lambda x: (
            eqx.filter(x.value, _is_signature_leaf) if isinstance(x, HeldArrays) else x
        ),
        tree,
        is_leaf=lambda x: isinstance(x, HeldArrays),
    )
    if not numbers_by_value:
        # (An operator whose structure holds host-derived data counts by what
        # its class registered: see `STATE_SIGNATURES`.)
        tree = jtu.tree_map(
            lambda x: STATE_SIGNATURES.get(type(x), _unchanged)(x),
            tree,
            is_leaf=lambda x: type(x) in STATE_SIGNATURES,
        )
    leaves, treedef = jtu.tree_flatten(tree)
    return treedef, tuple(_signature_of_leaf(x, numbers_by_value) for x in leaves)


def _unchanged(x: Any) -> Any:
    return x


def _signature_of_leaf(x: Any, numbers_by_value: bool) -> Any:
    if _is_array_or_struct(x) or (_is_signature_leaf(x) and not numbers_by_value):
        if isinstance(x, (bool, int)):
            # As the float it acts as: a state of `op * 2` was refused for
            # `op * 2.0` ("does not match"), where each scales a float operator
            # alike. (A state's operator is never an integer one.)
            x = float(x)
        return jnp.shape(x), jnp.dtype(jnp.result_type(x))
    if _is_signature_leaf(x):
        # With its type: `2 == 2.0` and they hash alike, but `init` of `op * 2`
        # and of `op * 2.0` hold numbers of different dtypes.
        return type(x), x
    return x


# What `solver.init` returns depends only on the solver and on the structure,
# shapes and dtypes of the operator and the options: traced once per such key
# (with `filter_eval_shape`), not on every call that passes `state=`.
_EXPECTED_STATES: dict = {}
_NOT_CACHED: Any = object()


def _expected_state(operator, options, solver, transposed=False) -> tuple | None:
    """The signature of `solver.init(operator, options)`; with `transposed`, of
    `solver.transpose` of the state of `operator`'s transpose."""
    try:
        signature = _state_signature((operator, options), numbers_by_value=True)
        key = (solver, signature, transposed)
        hash(key)
    except TypeError:  # something unhashable: no caching
        key = None
    # One `get` (`None` is a value here: no state): `key in` then `[key]` raised
    # `KeyError` where another thread emptied the full cache between the two.
    cached = _NOT_CACHED if key is None else _EXPECTED_STATES.get(key, _NOT_CACHED)
    if cached is not _NOT_CACHED:
        return cached
    init = _transposed_init(solver) if transposed else solver.init
    try:
        expected = eqx.filter_eval_shape(init, operator, options)
    except Exception:  # noqa: BLE001 - reported by `compute` instead
        want = None
    else:
        want = _state_signature(eqx.filter(expected, _is_signature_leaf))
    if key is not None:
        if len(_EXPECTED_STATES) >= 256:
            _EXPECTED_STATES.clear()
        _EXPECTED_STATES[key] = want
    return want


def _transposed_init(solver: AbstractLinearSolver):
    def init(operator, options):
        state = solver.init(operator.transpose(), options)
        return solver.transpose(state, options)[0]

    return init


def linear_solve(
    operator: AbstractLinearOperator,
    vector: PyTree[ArrayLike],
    solver: AbstractLinearSolver = AutoLinearSolver(well_posed=True),
    *,
    options: dict[str, Any] | None = None,
    state: PyTree[Any] = _sentinel,
    throw: bool = True,
) -> Solution:
    r"""Solve `operator @ x = vector` for `x`: the pseudoinverse solution.

    This is a linear solve for a square nonsingular operator, the least-squares
    solution for an overdetermined one, the minimum-norm solution for an
    underdetermined one, and the minimum-norm least-squares solution in general,
    provided the solver supports the case (see [`lineax.AutoLinearSolver`][]).

    The solution has the dtypes of `operator.in_structure()`. An operator that
    mixes real and complex leaves (e.g. real inputs to complex outputs) is not
    complex-linear. A least-squares solver (one that accepts non-square
    operators: QR, SVD, LSMR, `Normal`, `AutoLinearSolver(well_posed=None or
    False)`) solves, and differentiates, the real problem of its real and
    imaginary parts (see the FAQ). A solver for square operators (`LU`, the
    default `AutoLinearSolver(well_posed=True)`, `Cholesky`, `Diagonal`, ...)
    solves the promoted complex system, as NumPy would, and returns the real
    part at real leaves (as lineax 0.1.1 does): that is the solution when one
    with real leaves exists (the imaginary part dropped is then rounding), and
    not a solution of any kind when none does; for such a problem use a
    least-squares solver. No run-time check tells the two apart.

    It is differentiable in forward and reverse mode, to any order, with respect to
    the operator's arrays and the vector, and may be `jit`ted and `vmap`ped. The
    derivative is the pseudoinverse JVP (equations (1)-(4) of the lineax paper),
    picked from the solver's rank assumptions, and never differentiates through the
    solver's internals.

    **Arguments:**

    - `operator`: a [`lineax.AbstractLinearOperator`][].
    - `vector`: the right-hand side, a PyTree with the structure of
        `operator.out_structure()`. Integer arrays, lower-precision floats and
        Python numbers (which have no precision of their own, as in JAX) are
        converted to the operator's dtype; anything else that would lose
        information is a `ValueError`.
    - `solver`: a [`lineax.AbstractLinearSolver`][]. Defaults to
        `lx.AutoLinearSolver(well_posed=True)`.
    - `options`: a dictionary of solver options, e.g. `"preconditioner"` and `"y0"`
        for iterative solvers. An initial guess `"y0"` changes the answer only
        where the solution is not unique: [`lineax.LSMR`][] from `y0` returns
        `y0 + pinv(A) (b - A y0)`, and is differentiated as such, `y0` included
        (see "How it works"). A key that no solver reads raises a `ValueError`
        (a typo); a key that some solver reads but `solver` does not is
        accepted and ignored, as lineax 0.1.1 accepts any key, so that one
        `options` dict serves when switching solvers. So `"damp"`, read by
        [`lineax.LSMR`][] alone, changes nothing with [`lineax.LU`][],
        [`lineax.SVD`][], [`lineax.CG`][], [`lineax.AutoLinearSolver`][] or
        `lx.Normal(lx.Cholesky())`: for damped least squares with another
        solver, solve with the operator `[A; damp I]` (or `AᴴA + damp² I`).
    - `state`: the output of `solver.init(operator, options)`, to reuse e.g. a
        factorisation across right-hand sides (for an operator mixing real and
        complex leaves solved by a least-squares solver, the `Solution.state` of
        an earlier solve). Computed if not passed.
    - `throw`: if `True` (default), a failed solve raises a runtime error (also
        under `jit`), saying which solve failed (the primal, a tangent or a
        cotangent one). If `False`, never raises: check `Solution.result`. Under
        differentiation with `throw=False`, a failed tangent or cotangent solve
        gives NaN tangents/cotangents (its result cannot be reported in `result`).

    **Returns:**

    A [`lineax.Solution`][].
    """
    if throw is not True and throw is not False:  # (no call where it is a bool)
        _check_throw(throw)
    if options is None and state is _sentinel:
        flat = FLAT_FIELDS.get(type(operator))
        if flat is not None:
            try:
                solution = _run_flat(operator, vector, solver, throw, flat)
            except ShardingTypeError as error:  # (as `_linear_solve_entry`)
                note_explicit_axes(error, (operator, vector))
                raise
            if solution is not None:
                return solution
    return _linear_solve_entry(
        operator, vector, solver, options, state, throw, value_only=False
    )


def _run_flat(operator, vector, solver, throw, flat: tuple) -> Solution | None:
    """`_run_compiled` for an operator of a class declared by `register_flat`
    (a `MatrixLinearOperator`) and a JAX array for the vector, with no options
    or state, called outside of every trace: the hot path of an un-jitted small
    solve. Its cached programs are found under `_flat_structure`'s key, as
    `_run_compiled` stores them, from the operator's fields read from its
    `__dict__`: no PyTree flatten, no structure built or hashed (Equinox's
    flatten of the operator and the vector took 3 of the 11 us around a 10x10
    solve's compiled call). `None` where anything else holds (a miss, a leaf
    of another type, a trace, JAX's debug flags, a caller reading the state
    or statistics: see `_run_compiled`), which `_linear_solve_entry` solves.
    (Written for the cost of each line: around a compiled call, which empties
    the processor's caches, every Python call and object counts 2-3x its cost
    in a loop of its own.)"""
    arrays_of, statics_of, size, count = flat
    fields = instance_dict(operator)
    if len(fields) != size:
        return None
    try:
        leaves = (
            [arrays_of(fields), vector] if count == 1 else [*arrays_of(fields), vector]
        )
        structure = (type(operator), statics_of(fields))
    except KeyError:  # a field missing (and some other attribute in its place)
        return None
    if (
        not _JAX_ARRAY_TYPES.issuperset(map(type, leaves))
        or TRACE.value is not EVAL_TRACE  # (`no_active_trace()`, inline)
        or TRACE_AXES.value is not TOP_AXES
        or _DEBUG_NANS.value
        or _DEBUG_INFS.value
    ):
        return None
    solver_key = _SOLVER_KEYS.get(id(solver))
    if solver_key is None or solver_key[0] is not solver:
        solver_key = (None, _solver_key(solver))
    key = (structure, False, None, solver_key[1])
    # Without the lock (a lookup in a dict changes nothing: no thread evicting
    # meanwhile sees the dict change), nor moving the entry to the end of
    # `_COMPILED` (1 us of 16 with the lock): `used` tells `_make_room` instead.
    try:
        programs = _COMPILED.get(key)
    except TypeError:  # unhashable static data or solver leaves
        return None
    if type(programs) is not _Programs or programs.fields_read:
        return None
    programs.used = True
    return _lean_solution(
        programs, leaves, operator, vector, solver, None, _sentinel, throw
    )


def _flat_structure(operator, vector, leaves: list) -> tuple | None:
    """The part of a `_COMPILED` key that stands for the PyTree structure of
    `(operator, vector, None)` (whose leaves are `leaves`: no state) where
    `_run_flat` finds it: the operator's class and static values, where its
    class is declared by `register_flat` and the leaves are its array fields
    and the vector itself, each a concrete JAX array; else `None`. (Tested
    against the flatten's leaves, one by one: a class whose fields Equinox
    flattens otherwise keeps its PyTree structure as its key; so does a vector
    that is a container of one array, `(b,)`, whose leaves are those of `b`.)
    Two operators with the same class and static values, each holding a JAX
    array in each of its array fields, have the same PyTree structure; and
    this key never equals a PyTree structure (it is a tuple)."""
    flat = FLAT_FIELDS.get(type(operator))
    if flat is None:
        return None
    arrays_of, statics_of, size, count = flat
    fields = instance_dict(operator)
    if len(fields) != size or len(leaves) != count + 1:
        return None
    try:
        arrays = (arrays_of(fields),) if count == 1 else arrays_of(fields)
        structure = (type(operator), statics_of(fields))
    except KeyError:
        return None
    if leaves[-1] is not vector or any(
        x is not leaf for x, leaf in zip(arrays, leaves)
    ):
        return None
    for leaf in leaves:
        if not isinstance(leaf, jax.Array) or isinstance(leaf, jax.core.Tracer):
            return None
        _JAX_ARRAY_TYPES.add(type(leaf))
    return structure


try:  # JAX's own holders of its flags: 4x cheaper to read than `jax.config`'s.
    from jax._src.config import (
        debug_infs as _DEBUG_INFS,
        debug_nans as _DEBUG_NANS,
    )
except ImportError:  # pragma: no cover - a future JAX

    class _Flag:
        def __init__(self, name: str):
            self.name = name

        @property
        def value(self) -> bool:
            return getattr(jax.config, self.name)

    _DEBUG_INFS, _DEBUG_NANS = _Flag("jax_debug_infs"), _Flag("jax_debug_nans")


def _linear_solve_entry(
    operator, vector, solver, options, state, throw, value_only: bool
) -> Solution:
    """`linear_solve`, un-jitted through the cached compiled solve where it can be.
    With `value_only`, the caller reads `value` alone (and `result` through
    `throw`): see `_solve_of_leaves`."""
    try:
        if no_active_trace():
            # Called outside of every JAX transformation: run one cached compiled
            # function instead of dispatching every operation eagerly (about 100x
            # faster for small problems; 4x for a reused `state=` of an n = 300 LU,
            # as `lx.invert(operator).mv` does, and 18x for a CG solve with `y0`,
            # measured). Trace-time checks still run, on the first call for each
            # combination of shapes, dtypes and static data.
            # Under `jax_debug_nans`/`jax_debug_infs`, though, a failed solve's
            # output (NaN from a singular LU) is reported by JAX when the compiled
            # function returns, before its result code is read on the host: an
            # un-jitted singular `LU` solve raised JAX's
            # `InternalFloatingPointError: ('jit(_solve_triangular)', 'nan')`
            # instead of the "operator is singular" message (lineax 0.1.1, whose
            # check is in the program, raised its message). The program with its
            # check inside raises first. (The flags are read inline: every
            # function called here is a per-call cost of the warm solve.)
            config: Any = jax.config
            run = (
                _run_jitted
                if throw and (config.jax_debug_nans or config.jax_debug_infs)
                else _run_compiled
            )
            solution = run(operator, vector, solver, options, state, throw, value_only)
            if solution is not None:
                return solution
        elif not staging():
            # A function that reads globals, traced afresh (`function.retraced`):
            # its globals' current values become inputs of the solve. Kept as
            # it is, it is static data of the solve's primitive, whose trace
            # JAX and lineax cache on it: an un-jitted `jax.vmap`, `jax.grad`
            # or `jax.jvp` of a CG or GMRES solve read a global rebound since
            # stale (where `retraced` cannot, it still may: see its docstring).
            tree = (operator, options, state)
            converted = _retraced(tree, jtu.tree_leaves(tree))
            if converted is not None:
                operator, options, state = converted
            # Under a transformation applied un-jitted (`jax.grad`, `jax.jvp` or
            # `jax.vmap` of a Python function): the solve as one cached `jax.jit`,
            # which JAX transforms as a whole and runs compiled, instead of its
            # operations transformed and dispatched one by one. An un-jitted
            # `jax.grad` of a 10 x 10 solve, a warm call: LU 14.6 -> 2.2 ms, GMRES
            # 34 -> 2.6 ms, LSMR with `damp` about 640 ms (three compiles of the
            # eager error check) -> 5.1 ms; lineax 0.1.1, whose `linear_solve` is
            # `eqx.filter_jit`ted, 7-10 ms.
            solution = _run_jitted(
                operator, vector, solver, options, state, throw, value_only
            )
            if solution is not None:
                return solution
        return _linear_solve(operator, vector, solver, options, state, throw)
    except ShardingTypeError as error:
        # (A direct solver's `init` fails here, at trace time; an iterative
        # solver's loop is traced at lowering, see `_linear_solve_lowering`.)
        note_explicit_axes(error, (operator, vector))
        raise


def _run_compiled(
    operator, vector, solver, options, state, throw, value_only
) -> Solution | None:
    """The solve by the cached compiled function, or `None` where there is none
    (an operator, option or state that is not cacheable, a traced leaf, a solver
    holding arrays)."""
    # (A state passed is a fourth element, of its own structure.)
    inputs = (operator, vector, options)
    leaves, treedef = jtu.tree_flatten(
        inputs if state is _sentinel else (*inputs, state)
    )
    statics = ()
    # (The types seen before tested without a Python call: see `_concrete`.)
    if not _CONCRETE_TYPES.issuperset(map(type, leaves)) and not _concrete(leaves):
        # (Tested only here: a matrix operator's call pays nothing for it.)
        tree = (operator, options, state)
        converted = _retraced(tree, leaves)
        if converted is None:
            return None
        if converted is not tree:
            operator, options, state = converted
            inputs = (operator, vector, options)
            leaves, treedef = jtu.tree_flatten(
                inputs if state is _sentinel else (*inputs, state)
            )
        leaves, statics = _without_statics(leaves)
        if not statics or not _concrete(leaves):
            return None
    structure = None
    if options is None and state is _sentinel and not statics:
        structure = _flat_structure(operator, vector, leaves)
    key, programs = _compiled_linear_solve(
        operator,
        options,
        state,
        treedef,
        statics,
        solver,
        value_only,
        None,
        structure,
    )
    if programs is _RENT:
        return _solved_op_by_op(key, operator, vector, solver, options, state, throw)
    if programs is None:
        return None
    # Compiled with no in-graph checks but the result code (`throw=None`), which
    # is read here, on the host; so are the inputs, if the solve failed, where
    # they are what the in-graph check examines: arrays that the operator's
    # action reads (else the traced path says why the solve failed).
    # The state and statistics are left pending (see `_Programs`), except where
    # a caller has read them from this entry before, or under `jax_debug_nans` or
    # `jax_debug_infs`, where JAX checks each output of a program as it returns
    # (not later, when they are read). (With `throw`, the flags are off here:
    # `_linear_solve_entry` read them.)
    if programs.complete is not None and not _JAX_ARRAY_TYPES.issuperset(
        map(type, leaves)
    ):
        leaves = _on_device(leaves)
    config: Any = jax.config
    if programs.fields_read or (
        not throw
        and programs.complete is not None
        and (config.jax_debug_nans or config.jax_debug_infs)
    ):
        return _run_complete(
            programs, leaves, operator, vector, solver, options, state, throw
        )
    return _lean_solution(
        programs, leaves, operator, vector, solver, options, state, throw
    )


def _lean_solution(
    programs: "_Programs", leaves, operator, vector, solver, options, state, throw
) -> Solution:
    """The solve by `programs.lean`, its result code read on the host (see
    `_run_compiled`): the `Solution` of its outputs, the value and the result
    code, its result built, and its state and statistics computed by
    `programs.complete` (once for both), when first read."""
    value, code_array = programs.lean(leaves)
    programs.solves += 1
    if programs.solves >= _READS_WINDOW:
        programs.solves //= 2
        programs.reads //= 2
    if np.asarray(code_array):
        code_array = _failed(
            code_array, operator, vector, solver, options, state, throw
        )
        if isinstance(code_array, Solution):
            return code_array
    # (A `partial` of a function, not a closure, whose cells and function were
    # made on every call: see `_run_flat`.)
    pending = functools.partial(_pending_field, programs, code_array, leaves, [])
    if programs.value_is_leaf:
        return pending_solution(value[0], pending)
    return pending_solution(_joined(value, programs.value_layout), pending)


def _failed(
    code_array: Array, operator, vector, solver, options, state, throw
) -> Solution | Array:
    """After a compiled solve (`throw=None`) failed with the result code
    `code_array` (read on the host): the traced path's solution, where it says
    why (and does what Equinox's error mode says: `EQX_ON_ERROR=nan`, NaN, not
    an error); else the code classified from the inputs on the host, raised as
    an error under `throw` or returned."""
    code = np.asarray(code_array)
    if not reads_every_leaf(operator) or (throw and EQX_ON_ERROR != "raise"):
        return _linear_solve(operator, vector, solver, options, state, throw)
    inputs = jtu.tree_leaves((operator, vector, (options or {}).get("y0")))
    code = host_result_code(code, *[x for x in inputs if is_inexact_array(x)])
    if throw:
        raise eqx.EquinoxRuntimeError(primal_failure_message(int(code)))
    return jnp.asarray(code, code_array.dtype)


# The types of leaf that are JAX arrays (see `_on_device`).
_JAX_ARRAY_TYPES: set[type] = set()


def _on_device(leaves: list) -> list:
    """`leaves` (concrete arrays) with their NumPy arrays put on the device now,
    as the compiled call would put them: the pending state and statistics of an
    un-jitted solve are computed from its leaves when read, perhaps after the
    caller has overwritten a NumPy buffer in place (a loop refilling one
    matrix), and must be those of the arrays solved (see `device_copy`)."""
    for leaf in leaves:
        if isinstance(leaf, jax.Array):
            _JAX_ARRAY_TYPES.add(type(leaf))
    return [device_copy(x) if isinstance(x, np.ndarray) else x for x in leaves]


def _run_complete(
    programs, leaves, operator, vector, solver, options, state, throw
) -> Solution:
    """`_run_compiled` by `programs.complete`: the whole solution at once."""
    value, (code_array,), state_out, stats, layout = programs.complete(leaves)
    if np.asarray(code_array):
        code_array = _failed(
            code_array, operator, vector, solver, options, state, throw
        )
        if isinstance(code_array, Solution):
            return code_array
    return solution_of(
        _joined(value, layout.value),
        jtu.tree_unflatten(layout.result, [code_array]),
        _joined(stats, layout.stats),
        _joined(state_out, layout.state),
    )


def _pending_field(
    programs: "_Programs", code: Array, leaves: list, completed: list, name: str
) -> Any:
    """The field `name` of a pending solution (see `_lean_solution`), computed
    from the solve's `leaves` (once for the state and statistics, kept in
    `completed`)."""
    if name == "result":
        return jtu.tree_unflatten(programs.result_def, [code])
    if programs.complete is None:  # `value_only`: none, as before
        return {} if name == "stats" else None
    if not completed:
        _check_not_deleted(name, leaves)
        programs.counted_read()
        # (Concretely, also where a field is first read inside a trace, as
        # a constant closed over by a jitted function: they are the
        # un-jitted solve's arrays, not values of that trace.) With
        # `jax_debug_nans` and `jax_debug_infs` off, as they were when the
        # solve ran (else it would have run `complete` then, see
        # `_run_compiled`): the statistics of a failed solve (`throw=False`),
        # read under `jax.debug_nans(True)`, raised JAX's "invalid value
        # (nan) encountered in sqrt" from recomputing its NaN value.
        # And with `jax_enable_x64` on where the solve's arrays say it was
        # (a 64-bit one): turned off since, reading `sol.stats` raised "The
        # solve holds an array of dtype float64, which JAX does not allow
        # while `jax_enable_x64` is off", for a solve that had run.
        config: Any = jax.config
        x64 = config.jax_enable_x64 or any(
            jax.dtypes.canonicalize_dtype(x.dtype) != x.dtype for x in leaves
        )
        with (
            jax.core.eval_context(),
            jax.debug_nans(False),
            jax.debug_infs(False),
            jax.enable_x64(x64),
        ):
            completed.append(programs.complete(leaves))
    *_, state, stats, layout = completed[0]
    if name == "state":
        return _joined(state, layout.state)
    return _joined(stats, layout.stats)


def _check_not_deleted(name: str, leaves: list) -> None:
    """Raise a RuntimeError saying why, where a JAX array among the `leaves` of
    a pending solution (the solve's inputs: see `_lean_solution`) has been
    deleted since the solve, by `x.delete()` or by donating it to a jitted
    function (`donate_argnums`). The field cannot be computed any more; JAX's
    own error, raised from reading `sol.stats`, named none of the caller's
    steps: "Array has been deleted with shape=float64[4,4]" (a RuntimeError),
    or for a 64x64 matrix "INVALID_ARGUMENT: Invalid buffer passed to
    Execute() ... Buffer has been deleted or donated" (a ValueError). (The
    NumPy arrays among them are the solve's own device copies, see
    `_on_device`.)"""
    deleted = [x for x in leaves if isinstance(x, jax.Array) and x.is_deleted()]
    if not deleted:
        return
    arrays = ", ".join(f"{x.dtype}{list(x.shape)}" for x in deleted)
    raise RuntimeError(
        f"`Solution.{name}` of a `linear_solve` called un-jitted is computed when "
        "first read, from the arrays that the solve was given, and some of them "
        f"({arrays}) have been deleted since (by `.delete()`, or by donating them "
        "to a jitted function with `donate_argnums`). Read the state and "
        "statistics you need before deleting or donating the operator's arrays, "
        "the vector or the options, or call `linear_solve` inside `jax.jit` "
        "(which returns them computed)."
    )


def _run_jitted(
    operator, vector, solver, options, state, throw, value_only
) -> Solution | None:
    """The solve as the cached `jax.jit` of `_solve_of_leaves` with its checks
    (`throw`) in the program, called with the (traced) leaves; or `None` where
    there is none (as `_run_compiled`)."""
    inputs = (operator, vector, options)
    leaves, treedef = jtu.tree_flatten(
        inputs if state is _sentinel else (*inputs, state)
    )
    leaves, statics = _without_statics(leaves)
    # (`is_cacheable` asks that the static data compare by value, and that the
    # arrays be concrete, which these are not: it is asked of stand-ins.)
    stand_ins = _stand_ins((operator, options, state))
    key, jitted = _compiled_linear_solve(
        stand_ins[0],
        stand_ins[1],
        stand_ins[2],
        treedef,
        statics,
        solver,
        value_only,
        throw,
    )
    if jitted is _RENT:
        return _solved_op_by_op(key, operator, vector, solver, options, state, throw)
    if jitted is None:
        return None
    try:
        try:
            return jitted(leaves)
        except TypeError as error:
            return _static_output(
                error, key, leaves, treedef, statics, solver, value_only, throw
            )
    except jax.errors.JaxRuntimeError as error:
        # A failure of the solve (or of its tangent solve, under `jax.jvp`), raised
        # as the un-jitted entry raises it: as Equinox's error with the message,
        # not XLA's error around it ("INTERNAL: CpuCallback error", a traceback,
        # then the message). (The cotangent solves of `jax.grad` run after this
        # returns, in JAX's backward pass: their failures surface as under
        # `jax.jit`.)
        _, marker, message = str(error).partition("_EquinoxRuntimeError: ")
        if not marker:
            raise
        raise eqx.EquinoxRuntimeError(message.strip()) from None


def _static_output(error, key, leaves, treedef, statics, solver, value_only, throw):
    """After the cached solve under `key` raised `error` (a `TypeError`): the
    solve compiled to return its non-array parts as static data, cached under
    `key` and called; or `None` where that fails too."""
    # A solution that is not all arrays cannot be the output of a compiled
    # function: e.g. LSMR's `damp` option reformulates the operator as a
    # closure-converted function, which the state keeps. Such a solve returns
    # its non-array parts as static data of its output instead (from the trace,
    # as `eqx.filter_jit` does): run eagerly, it compiled LSMR's loop anew on
    # every call (0.56 s, against 0.2 ms compiled). (Any other error at trace
    # time is raised again by the eager path.)
    if "not a valid JAX type" not in str(error):
        raise error
    solve = _solve_of_leaves(treedef, statics, solver, value_only, throw)
    compiled = _with_static_output(solve)
    _replace_compiled(key, compiled)
    try:
        return compiled(leaves)
    except TypeError as again:
        if "not a valid JAX type" not in str(again):
            raise
        _replace_compiled(key, _EAGER)
        return None


def _replace_compiled(key, entry) -> None:
    """Store `entry` under `key` of `_COMPILED`, under its lock and within its
    bound. Written without the lock, an entry added while another thread evicts
    (`del _COMPILED[next(iter(_COMPILED))]`) makes that thread's `next` raise
    `RuntimeError: dictionary changed size during iteration` out of a user's
    solve; and an entry evicted meanwhile came back above `_COMPILED_MAX`."""
    with _COMPILED_LOCK:
        if key not in _COMPILED:
            _make_room()
        _COMPILED[key] = entry


def _make_room() -> None:
    """Evict the least recently used entries of `_COMPILED` (its lock held) until
    one more fits within `_COMPILED_MAX`. An entry found by `_run_flat` since it
    last came round (which, not holding the lock, does not move it to the end)
    is moved to the end instead, once: the "second chance" of the clock
    algorithm, an approximation of least recently used."""
    while len(_COMPILED) >= _COMPILED_MAX:
        key = next(iter(_COMPILED))
        entry = _COMPILED.pop(key)
        if type(entry) is _Programs and entry.used:
            entry.used = False
            _COMPILED[key] = entry


def _stand_ins(tree: PyTree) -> PyTree:
    """`tree` with a concrete stand-in of the same shape (a broadcast view, no
    memory) for each traced leaf."""

    def stand_in(x):
        if isinstance(x, jax.core.Tracer):
            return np.broadcast_to(np.zeros((), x.dtype), x.shape)
        return x

    return jtu.tree_map(stand_in, tree)


def _linear_solve(operator, vector, solver, options, state, throw) -> Solution:
    if not isinstance(operator, AbstractLinearOperator):
        raise TypeError(
            "`operator` must be a `lineax.AbstractLinearOperator` (e.g. "
            f"`lx.MatrixLinearOperator(matrix)`), got {type(operator).__name__}."
        )
    check_solver(solver, "solver")
    out_structure = operator.out_structure()
    vector = _check_vector(operator, out_structure, vector)
    options = _check_options(options, solver)
    # A test of dtypes, no trace: what an ordinary solve pays for the realified
    # problem (4 us measured). `in_structure` is called on the class: an Equinox
    # module's bound method is a new Module at each access (the test took 63 us
    # through `operator.in_structure()` and `operator.out_structure()`).
    in_structure = type(operator).in_structure(operator)
    # Posed here, before `init`, so that the primitive solves and differentiates
    # (JVP, transpose, vmap) a real problem, with no rule of its own: see
    # `_operator/realified.py`.
    posed = _realified_problem(operator, in_structure, out_structure, options, solver)
    realify = posed is not None
    if posed is not None:
        vector = realified_vector(operator, posed[0], vector)
        operator, options = posed
    posed_problem = solver.reformulate(operator, vector, options)
    operator, vector, options = posed_problem[:3]
    if state is _sentinel:
        # The state is a function of the operator, but derivatives are taken by
        # the primitive's JVP rule with respect to `operator` directly; stopping
        # gradients here means the factorisation is never differentiated.
        state = solver.init(_stop_gradient(operator), options)
        kind = "primal"
    else:
        mismatch = _realified_mismatch(operator) if realify else _STATE_MISMATCH
        _check_state(state, operator, options, solver, mismatch)
        state = _stop_gradient(state)
        kind = "primal-reused-state"
    solution, result, stats = bind(
        operator, state, vector, options, solver, throw, kind
    )
    if len(posed_problem) == 4:
        # Outside the primitive: differentiated by JAX (see `reformulate`).
        solution = posed_problem[3](solution)
    if realify:
        solution = joined(in_structure, solution)
    else:
        _check_solution_shapes(solver, in_structure, solution)
        solution = _in_dtypes(in_structure, solution)
    return Solution(value=solution, result=result, stats=stats, state=state)


def _check_solution_shapes(
    solver: AbstractLinearSolver,
    structure: PyTree[jax.ShapeDtypeStruct],
    solution: PyTree[Array],
) -> None:
    """Raise a ValueError naming a user's solver class unless the solution its
    `compute` returned has the PyTree structure and shapes of the operator's
    input. (Dtypes may differ: see `_in_dtypes`.) A solution of the wrong shape
    was returned as it was, and failed only under differentiation, in `lax`; one
    of the wrong PyTree failed here with "'tuple' object has no attribute
    'dtype'"."""
    shapes = jtu.tree_map(jnp.shape, solution)
    if jtu.tree_structure(solution) == jtu.tree_structure(structure) and shapes == (
        jtu.tree_map(lambda s: s.shape, structure)
    ):
        return
    raise ValueError(
        f"`{type(solver).__name__}.compute` must return a solution with the "
        f"structure of the operator's input, {describe(structure)}; got "
        f"{describe(jax.eval_shape(lambda: solution))}."
    )


def _in_dtypes(
    structure: PyTree[jax.ShapeDtypeStruct], x: PyTree[Array]
) -> PyTree[Array]:
    """The solution `x` in the dtypes of the operator's input `structure`, as
    lineax 0.1.1 returns it. The matrix solvers compute in the promoted dtype of
    a PyTree operator whose leaves mix dtypes (NumPy's promotion): a float32 leaf
    came back float64, which changes the carry of a user's `lax.scan` or
    `while_loop` (an Optimistix iterate). At a real leaf of an operator mixing
    real and complex leaves, solved as the promoted complex system (by a solver
    for square operators, see `_solves`), this is the real part: where a
    solution with real leaves exists (and the operator is nonsingular) it is
    that solution, and the imaginary part dropped is rounding; where none
    exists, it is not a least-squares solution of any kind, which is why a
    least-squares solver solves the realified problem instead. Leaves already
    in their dtype are returned as they are: no operation for an ordinary
    solve."""
    return jtu.tree_map(_in_dtype, structure, x)


def _in_dtype(struct: jax.ShapeDtypeStruct, leaf: Array) -> Array:
    """One leaf of `_in_dtypes`. (Not a closure: see `_misc._floating_struct`.)"""
    if leaf.dtype == struct.dtype:
        return leaf
    return cast_keeping_real(leaf, struct.dtype)


def _realified_problem(
    operator: AbstractLinearOperator,
    in_structure: PyTree[jax.ShapeDtypeStruct],
    out_structure: PyTree[jax.ShapeDtypeStruct],
    options: dict[str, Any],
    solver: AbstractLinearSolver,
) -> tuple[AbstractLinearOperator, dict[str, Any]] | None:
    """The realified operator and options that `linear_solve` (and `invert`)
    solve where `operator` mixes real and complex leaves and `solver` solves that
    problem (see `_solves`); else `None`: the operator is solved as it is."""
    if not mixes_real_and_complex(in_structure, out_structure):
        return None
    problem = realified(operator)
    problem_options = realified_options(operator, options)
    if not _solves(solver, problem, problem_options):
        return None
    return problem, problem_options


def _solves(
    solver: AbstractLinearSolver,
    problem: AbstractLinearOperator,
    options: dict[str, Any],
) -> bool:
    """Whether `solver` solves the realified `problem` of an operator mixing real
    and complex leaves: whether its `init` accepts it.

    The realified problem has another shape than the operator (e.g. 8 real
    equations in 6 unknowns for 2 real and 2 complex unknowns with complex
    outputs) and no tags, so only a solver for non-square operators (least
    squares, minimum norm: QR, SVD, LSMR, `Normal`, `AutoLinearSolver(
    well_posed=None or False)`) accepts it. `init` is where every solver says
    which operators it accepts (`check_square`, tag checks); the rank flags do
    not tell them apart (`LU` and `QR` both assume full rank, and for a tall
    operator both say "dependent rows"). A solver for square operators solves
    the promoted complex system instead, as lineax 0.1.1 and NumPy do (see
    `linear_solve`). Traced abstractly, once per solver and structure (cached
    with the states that `_check_state` expects)."""
    return _expected_state(problem, options, solver) is not None


def _realified_mismatch(problem: AbstractLinearOperator) -> str:
    # The realified operator is not public (the problem solved is an
    # implementation detail): `Solution.state` and `lx.invert` are the ways to
    # reuse its state.
    return (
        "`state` does not match the problem solved. (The operator mixes real "
        "and complex leaves, e.g. it maps real inputs to complex outputs, so it "
        "is not complex-linear: with a least-squares solver, `linear_solve` "
        "solves the real problem of its real and imaginary parts, of input size "
        f"{problem.in_size()} and output size {problem.out_size()}.) So "
        "`solver.init(operator)`, which factorises the complex operator, does "
        "not fit: pass the `Solution.state` of an earlier solve with this "
        "operator and solver, or use `lx.invert(operator, solver)` to solve for "
        "many right-hand sides."
    )


# One `jax.jit`-ed function per structure of `(operator, vector)` (static data
# included) and solver, called with the flat list of arrays: JAX's C++ dispatch
# then sees only arrays, and keeps its own cache of executables per shape and
# dtype. Measured on an un-jitted 10x10 solve, against one `jax.jit` taking the
# treedef and the solver as static arguments: the same dispatch time, and this
# cache also answers, on a hit, the two questions asked before it:
# - whether the operator is cacheable (`is_cacheable`, asked on a miss; an entry
#   is made only for a cacheable operator). The answer depends on the
#   operator's structure and on its leaves being concrete arrays, which
#   `_run_compiled` tests on every call;
# - whether the solver is hashable. The key holds the solver's structure and
#   leaves (Python scalars, each with its type), not the solver: hashing and
#   comparing an Equinox module takes 2-8 us, which a solver built anew on
#   every call (`lx.LU()`) would pay on every lookup.
# Bounded, least recently used first out: each entry holds its executables.
_COMPILED: dict = {}
_COMPILED_MAX = 64
_COMPILED_LOCK = threading.Lock()
# The entry of a key whose solve cannot be compiled (see `_run_compiled`).
_EAGER = object()


def _solver_key(solver) -> tuple:
    """The solver's part of a `_COMPILED` key: its structure and its leaves, each
    with its type (`1 == 1.0 == True`, and they hash alike, but a solver holding
    one traces differently from one holding another: dtypes, `isinstance` tests,
    so they must not share a compiled function). Remembered for the last solvers
    seen, by identity (a module is immutable): the default solver, or one a user
    keeps, is flattened once, not on every call (1.3 of the 2.2 us a lookup took).
    A solver of scalar fields is not flattened at all (`_fields_key`)."""
    entry = _SOLVER_KEYS.get(id(solver))
    if entry is not None and entry[0] is solver:
        return entry[1]
    key = _fields_key(solver)
    if key is None:
        solver_leaves, solver_treedef = jtu.tree_flatten(solver)
        key = (solver_treedef, *[(type(x), x) for x in solver_leaves])
        try:
            hash(key)
        except TypeError:  # a solver holding arrays: `_compiled_linear_solve` says so
            return key
    if len(_SOLVER_KEYS) >= 16:
        _SOLVER_KEYS.clear()
    # (The entry holds the solver, so that its `id` is not reused meanwhile.)
    _SOLVER_KEYS[id(solver)] = (solver, key)
    return key


_SOLVER_KEYS: dict[int, tuple[Any, tuple]] = {}


def _fields_key(module) -> tuple | None:
    """A `_solver_key` read from the fields of `module` (an Equinox module whose
    fields are all Python scalars, strings, `None`, functions or such modules):
    its type and each field's value with its type, without flattening it. A
    solver built anew on every call (`lx.linear_solve(op, b, lx.LU())`, the
    common way to write it) took 15 us longer to solve than one kept (10x10,
    25 -> 40 us), most of it in `jtu.tree_flatten` and in hashing its treedef;
    `lx.AutoLinearSolver(well_posed=True)`, 30 us. `None` for any other field
    (an array, a container), where the treedef and leaves are the key. Two
    solvers with equal keys have equal treedefs and leaves (the same type, the
    same field values, even of the same types), so they may share a compiled
    solve; and a key never equals one made from a treedef (its first element is
    a type, not a treedef)."""
    names = _FIELD_NAMES.get(type(module))
    if names is None:
        if not isinstance(module, eqx.Module):
            return None
        names = tuple(f.name for f in dataclasses.fields(module))
        _FIELD_NAMES[type(module)] = names
    values = module.__dict__
    key: list = [type(module)]
    for name in names:
        value = values.get(name, _sentinel)
        if type(value) in _KEYED_BY_VALUE:
            key.append((type(value), value))
        elif isinstance(value, eqx.Module):
            inner = _fields_key(value)
            if inner is None:
                return None
            key.append(inner)
        else:
            return None
    return tuple(key)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
# The field values `_fields_key` keys by themselves (and their type): hashable,
# compared by value or (functions) by identity, as a treedef compares them.
_KEYED_BY_VALUE = frozenset(
    {bool, int, float, complex, str, type(None), types.FunctionType}
)


def _retraced(tree: PyTree, leaves: list) -> PyTree | None:
    """`tree` with each function that reads globals (`function.reads_globals`)
    replaced by its trace now (`function.retraced`), so that its globals' current
    values become inputs of the solve; `None` if one cannot be. `leaves` are
    `tree`'s leaves or a superset: where none is a plain function, `tree` itself
    is returned (the common case, tested without a `tree_map`)."""
    if not any(type(leaf) is types.FunctionType for leaf in leaves):
        return tree
    failed = []

    def retrace(leaf):
        if not reads_globals(leaf):
            return leaf
        converted = retraced(leaf)
        if converted is None:
            failed.append(leaf)
        return converted

    tree = jtu.tree_map(retrace, tree, is_leaf=reads_globals)
    return None if failed else tree


def _without_statics(leaves: list) -> tuple[list, tuple]:
    """`leaves` without the jaxprs of closure-converted functions (see
    `function.holds_its_jaxpr`) and the Python numbers, and those with their
    positions: static data of the compiled solve, in its key (see `_static_key`).

    A Python number is the scale of `2.0 * operator` or `operator + 0.1 *
    identity`, and its sign is static information: it decides the definiteness
    tags of the scaled operator (`CG` needs them, `AutoLinearSolver` reads them),
    so it cannot become a traced input. Kept as a leaf, it made every such solve
    run op by op, 40-50x slower than a matrix operator (8.8 against 0.19 ms at
    n = 10; lineax 0.1.1 0.22 ms); now it is compiled per value, after the
    rental (`_renting`), so that a scale changed on every solve stays op by op.
    """
    return _set_apart(
        leaves, lambda leaf: isinstance(leaf, _Jaxpr) or type(leaf) in PYTHON_NUMBERS
    )


def _set_apart(leaves: list, is_static: Callable[[Any], bool]) -> tuple[list, tuple]:
    """`leaves` without those that `is_static`, and those with their positions
    (`_with_statics` puts them back)."""
    statics = tuple((i, leaf) for i, leaf in enumerate(leaves) if is_static(leaf))
    if not statics:
        return leaves, ()
    positions = {i for i, _ in statics}
    return [x for i, x in enumerate(leaves) if i not in positions], statics


def _static_key(statics: tuple) -> tuple:
    """The static leaves in a key: a jaxpr by identity, a Python number by its
    type and `repr` (`1 == 1.0 == True` and `-0.0 == 0.0`, but each scales
    differently; a NaN compares unequal to itself)."""
    return tuple(
        (i, x) if isinstance(x, _Jaxpr) else (i, type(x), repr(x)) for i, x in statics
    )


def _with_statics(leaves: list, statics: tuple) -> list:
    """The inverse of `_without_statics`."""
    leaves = list(leaves)
    for i, static in statics:
        leaves.insert(i, static)
    return leaves


_Jaxpr: Any = jax.extend.core.Jaxpr


def _renting(key: tuple) -> bool:
    """Whether the solve under `key`, with static leaves (its last element), is still
    to be dispatched op by op (called with `_COMPILED_LOCK` held): one not
    sighted before, or whose solves op by op have not yet taken `_EAGER_BUDGET`
    seconds in all.

    A jaxpr compares by identity: an operator made anew, with a new function (a
    `lambda` in a loop, or one made inside `jax.grad`), has a new one, and a
    solve compiled for it would never be found again. Compiling an un-jitted
    solve costs about as much as 50-150 solves op by op (LU 0.4-1 s, CG 1.5 s,
    GMRES 3 s, against 8-20 ms a solve; n = 10 and 100, measured). So, as in
    renting skis before buying them, the solves of a function operator (with
    one solver, options and vector structure) run op by op until they have
    taken `_EAGER_BUDGET` seconds, a fraction of a compile, and compiled from
    then on (0.15-0.4 ms a call): never more than one compile slower than
    solving op by op throughout, nor more than about `_EAGER_BUDGET` slower than
    compiling at the first solve, whatever the number of solves. (Timed, not
    counted: the time op by op ranges over 10x across solvers and sizes.)"""
    return _EAGER_SPENT.get(_rent_key(key), -1.0) < _EAGER_BUDGET


def _rent_key(key: tuple) -> tuple:
    """`key` in `_EAGER_SPENT`: its jaxprs by weak references (its numbers as they
    are), which keep no
    operator alive, and of which one to a jaxpr since freed equals none but
    itself (a new jaxpr at the freed one's `id`, as a preconditioner made anew
    for each solve of one operator has, would otherwise inherit its time, and
    be compiled, for nothing)."""
    *rest, statics = key
    return (
        *rest,
        tuple(
            (x[0], weakref.ref(x[1])) if isinstance(x[1], _Jaxpr) else x
            for x in statics
        ),
    )


def _solved_op_by_op(key, operator, vector, solver, options, state, throw):
    """`_linear_solve`, its time counted for `key` (see `_renting`)."""
    start = time.perf_counter()
    solution = _linear_solve(operator, vector, solver, options, state, throw)
    spent = time.perf_counter() - start
    rent_key = _rent_key(key)
    with _COMPILED_LOCK:
        if rent_key not in _EAGER_SPENT and len(_EAGER_SPENT) >= _EAGER_SPENT_MAX:
            # (Emptied when full: the keys of operators made anew, long gone,
            # fill it. One solved all along was compiled long before.)
            _EAGER_SPENT.clear()
        _EAGER_SPENT[rent_key] = _EAGER_SPENT.get(rent_key, 0.0) + spent
    return solution


# Seconds of solves op by op, per key of `_COMPILED`, before the solve is
# compiled.
_EAGER_BUDGET = 0.5
_EAGER_SPENT: dict = {}
_EAGER_SPENT_MAX = 256
# What `_compiled_linear_solve` returns for a solve that `_renting` keeps op by op.
_RENT: Any = object()


def _compiled_linear_solve(
    operator,
    options,
    state,
    treedef,
    statics: tuple,
    solver,
    value_only: bool,
    throw: bool | None,
    structure: tuple | None = None,
) -> tuple[Any, Any]:
    # (Keyed by `structure` in place of the treedef where `_run_flat` finds it.)
    structure = treedef if structure is None else structure
    key = (structure, value_only, throw, _solver_key(solver))
    if statics:
        # (The key holds the jaxprs: none is freed, and its `id` reused, while
        # its entry lives. See `_static_key`.)
        key = (*key, _static_key(statics))
    # Under the lock: solves run from several Python threads reorder and evict
    # entries concurrently, and an eviction iterating over `_COMPILED` while
    # another thread changes it raised `RuntimeError: dictionary changed size
    # during iteration`, or `KeyError` where two threads evicted the same entry.
    with _COMPILED_LOCK:
        try:
            compiled = _COMPILED.pop(key, None)
        except TypeError:  # a solver holding arrays (or unhashable static data)
            return None, None
        if compiled is _EAGER:
            _COMPILED[key] = compiled
            return key, None
        if compiled is None:
            if not (
                isinstance(solver, AbstractLinearSolver)
                and is_cacheable(operator)
                and _cacheable_operators((options, state))
            ):
                return None, None
            if statics and _renting(key):
                return key, _RENT
            _make_room()
            if throw is None:  # `_run_compiled`'s
                compiled = _Programs(treedef, statics, solver, value_only)
            else:
                compiled = jax.jit(
                    _solve_of_leaves(treedef, statics, solver, value_only, throw)
                )

        _COMPILED[key] = compiled
    return key, compiled


def _solve_of_leaves(
    treedef, statics: tuple, solver, value_only: bool, throw: bool | None
):
    def compiled(leaves):
        if statics:
            leaves = _with_statics(leaves, statics)
        operator, vector, options, *state = jtu.tree_unflatten(treedef, leaves)
        state = state[0] if state else _sentinel
        solution = _linear_solve(operator, vector, solver, options, state, throw)
        if value_only:
            # Without `stats` among the outputs, `jit` drops their computation
            # (see the primitive's `_dce_rule`): a direct solver's condition
            # estimate, which `lx.invert(operator).mv` computed on every call
            # and never returned (LU, n = 300: 12 -> 2 triangular solves, 28 ->
            # 6 fused kernels). Nor the state, an input returned as it came.
            solution = Solution(solution.value, solution.result, {}, None)
        return solution

    return compiled


class _Programs:
    """The compiled solves of a `_COMPILED` entry of `_run_compiled` (a solve
    called outside of every trace, its result code read on the host). Both
    return the arrays of the solution as flat lists: JAX's C++ dispatch then
    builds no Equinox module (unflattening a `Solution`, its `RESULTS` and its
    state took 8-14 us of a 10x10 solve).

    - `lean`: the value and the result code, returned as a `Solution` whose
      result is built, and whose state and statistics are computed by
      `complete`, when first read (see `_solution.pending_solution`). Without
      them among its outputs, `jit` drops what only they need (see
      `_solve_of_leaves`): a direct solver's condition estimate (Hager's
      method: several triangular solves), its state's norms and copies.
      Measured on a 10x10 LU solve un-jitted (CPU time of the calling
      thread): 43 us for the program with everything, 36 without the
      statistics, 26 without the state either; 16 for `jnp.linalg.solve`.
      The structure of its value and result (`value_layout`, `result_def`)
      is recorded when it is traced: they are those of the operator's input
      and of a result code, which the key of the entry decides, whatever the
      shapes of a call.
    - `complete`: everything, the non-array parts of its output as static data
      (`_Layout`: a state's structure holds shapes). None where the caller
      reads the value alone (`value_only`). Compiled when a pending field is
      first read; and the one run, from then on, once callers read the state
      or statistics of more than a third of the solves (`fields_read`;
      counted in `solves` and `reads`, halved every `_READS_WINDOW` solves):
      then the lean program and the complete one for the fields read would
      cost more than the complete one alone (43 against 26 + 43 / 3 us above).
      One solve whose state is kept, or whose statistics are printed, does not
      make every later solve pay for what they do not ask for."""

    __slots__ = (
        "lean",
        "complete",
        "value_layout",
        "value_is_leaf",
        "result_def",
        "fields_read",
        "solves",
        "reads",
        "used",
    )

    def __init__(self, treedef, statics: tuple, solver, value_only: bool):
        # (`jax.jit` compiles at the first call: `complete` costs nothing until
        # it is run.)
        solve = _solve_of_leaves(treedef, statics, solver, value_only, None)

        def compiled(leaves):
            solution = solve(leaves)
            value, self.value_layout = _split(solution.value)
            self.value_is_leaf = not self.value_layout[1] and jtu.treedef_is_leaf(
                self.value_layout[0]
            )
            (code,), self.result_def = jtu.tree_flatten(solution.result)
            return value, code

        self.lean = jax.jit(compiled)
        self.complete: Any = None if value_only else jax.jit(_complete_outputs(solve))
        self.value_layout: tuple = ()
        self.value_is_leaf = False
        self.result_def: Any = None
        self.fields_read = False
        self.solves = 0
        self.reads = 0
        # Found by `_run_flat` since `_make_room` last came to it.
        self.used = False

    def counted_read(self) -> None:
        """Count a solve whose pending state or statistics were read; switch to
        `complete` when that is more than a third of them (and three at least).
        (The counts are shared by threads unlocked: a lost update changes when
        the switch happens, not what a solve returns.)"""
        self.reads += 1
        if self.reads >= 3 and 3 * self.reads > self.solves:
            self.fields_read = True

    def lower(self, leaves: list) -> Any:
        """The program that a call with `leaves` runs now, lowered."""
        return (self.complete if self.fields_read else self.lean).lower(leaves)


# See `_Programs`: a window of 32-64 solves.
_READS_WINDOW = 64


class _Layout:
    """The static part of the output of `_Programs.complete`: the structures of
    the solution's value, result, state and statistics, with their leaves that
    are not arrays (see `_split`). A PyTree node without children, whose
    unflatten returns it as it is."""

    __slots__ = ("value", "result", "state", "stats")

    def __init__(self, value, result, state, stats):
        self.value = value
        self.result = result
        self.state = state
        self.stats = stats


jtu.register_pytree_node(_Layout, lambda x: ((), x), lambda x, _: x)


def _split(tree: PyTree) -> tuple[list, tuple]:
    """The arrays of `tree`, and its structure with its other leaves (static data
    of a compiled output) and their positions: see `_joined`."""
    leaves, treedef = jtu.tree_flatten(tree)
    arrays, statics = _set_apart(leaves, lambda x: not eqx.is_array(x))
    return arrays, (treedef, statics)


def _joined(arrays: list, layout: tuple) -> PyTree:
    """The inverse of `_split`: the tree of the arrays and its layout."""
    treedef, statics = layout
    # (A leaf, not an empty container: `treedef_is_leaf` is true of `{}` too,
    # and the empty statistics of `lx.Schur` and `lx.Woodbury` failed every
    # un-jitted solve with `throw=False` with an `IndexError`.)
    if not statics and treedef.num_leaves == 1 and jtu.treedef_is_leaf(treedef):
        return arrays[0]
    return jtu.tree_unflatten(treedef, _with_statics(arrays, statics))


def _complete_outputs(solve):
    """`solve` (of `_solve_of_leaves`) returning its solution's value, result
    code, state and statistics as lists of arrays, then their `_Layout`."""

    def compiled(leaves):
        solution = solve(leaves)
        value, value_layout = _split(solution.value)
        state, state_layout = _split(solution.state)
        stats, stats_layout = _split(solution.stats)
        result, result_def = jtu.tree_flatten(solution.result)
        layout = _Layout(value_layout, result_def, state_layout, stats_layout)
        return value, result, state, stats, layout

    return compiled


class _StaticOutput(eqx.Module):
    value: Any = eqx.field(static=True)


def _with_static_output(solve):
    """`solve` compiled to return the arrays of its solution, and the rest (from
    the trace) as static data of its output's structure."""

    @jax.jit
    def partitioned(leaves):
        dynamic, static = eqx.partition(solve(leaves), eqx.is_array)
        return dynamic, _StaticOutput(static)

    def call(leaves):
        dynamic, static = partitioned(leaves)
        return eqx.combine(dynamic, static.value)

    return call


def _cacheable_operators(tree: PyTree) -> bool:
    """Whether every operator in `tree` (a preconditioner in the options, the
    operators a structured solver's state keeps) is cacheable, as the solved
    operator must be (see `is_cacheable`)."""
    is_operator = lambda x: isinstance(x, AbstractLinearOperator)  # noqa: E731
    return all(
        is_cacheable(x)
        for x in jtu.tree_leaves(tree, is_leaf=is_operator)
        if is_operator(x)
    )


# The types of leaf that are concrete arrays (JAX arrays that are not tracers,
# NumPy arrays): a property of the type, so tested once per type.
_CONCRETE_TYPES: set[type] = set()


def _concrete(leaves: list) -> bool:
    """Whether every leaf is a concrete JAX or NumPy array."""
    for leaf in leaves:
        kind = type(leaf)
        if kind not in _CONCRETE_TYPES:
            if not isinstance(leaf, (jax.Array, np.ndarray)) or isinstance(
                leaf, jax.core.Tracer
            ):
                return False
            _CONCRETE_TYPES.add(kind)
    return True


def invert(
    operator: AbstractLinearOperator,
    solver: AbstractLinearSolver = AutoLinearSolver(well_posed=True),
    *,
    options: dict[str, Any] | None = None,
    throw: bool = True,
) -> FunctionLinearOperator:
    """The (pseudo)inverse of an operator, as a linear operator whose `mv` solves
    with `operator` (reusing one `solver.init`).

    **Arguments:**

    - `operator`: a linear operator.
    - `solver`, `options`, `throw`: as for [`lineax.linear_solve`][].

    **Returns:**

    A [`lineax.FunctionLinearOperator`][] from `operator.out_structure()` to
    `operator.in_structure()`, carrying the tags that hold for the inverse: those
    of a symmetric, positive or negative semidefinite, or diagonal operator;
    lower (upper) triangular if `operator` is and `solver` assumes full rank; and
    the unit diagonal of a unit triangular operator. Solvers picked from tags
    (e.g. by [`lineax.AutoLinearSolver`][]) then stay as cheap for the inverse.
    None where an operator mixing real and complex leaves is solved as its
    realified problem, by a least-squares solver (see [`lineax.linear_solve`][]).
    """
    if not isinstance(operator, AbstractLinearOperator):
        raise TypeError(
            f"`operator` must be a `lineax.AbstractLinearOperator`, got "
            f"{type(operator).__name__}."
        )
    check_solver(solver, "solver")
    options = _check_options(options, solver)
    _check_throw(throw)
    # The state of the problem that `linear_solve` solves (see there): of the
    # realified operator where it mixes real and complex leaves and `solver`
    # solves that, which carries no tags, so neither does its inverse.
    posed = _realified_problem(
        operator, operator.in_structure(), operator.out_structure(), options, solver
    )
    solved, solved_options = (operator, options) if posed is None else posed
    state = solver.init(_stop_gradient(solved), solved_options)
    solve = _InverseSolve(operator, solver, options, state, throw)
    tags = inverse_tags(solver, solved)
    # Not closure-converted where nothing traced is closed over: `solve` holds
    # its arrays as PyTree leaves (of the returned operator), and its `mv`,
    # called outside of every transformation, runs the cached compiled solve.
    # Converted, `mv` evaluated the solve's jaxpr operation by operation (5x
    # the time of the compiled solve with n = 300, measured).
    return FunctionLinearOperator(
        solve, operator.out_structure(), tags, closure_convert=False
    )


class _InverseSolve(eqx.Module):
    """`vector -> linear_solve(operator, vector, ...).value`, reusing `state`."""

    operator: AbstractLinearOperator
    solver: AbstractLinearSolver
    options: dict[str, Any]
    state: PyTree[Any]
    throw: bool = eqx.field(static=True)

    def __call__(self, vector: PyTree[Array]) -> PyTree[Array]:
        # `linear_solve`'s entry (its arguments were checked by `invert`), for
        # the value alone.
        return _linear_solve_entry(
            self.operator,
            vector,
            self.solver,
            self.options,
            self.state,
            self.throw,
            value_only=True,
        ).value

    def __lineax_output_structure__(self) -> PyTree[jax.ShapeDtypeStruct] | None:
        # The solution's structure: the operator's input structure, as
        # `linear_solve` returns it (the realified problem's solution is mapped
        # back to it). Only outside every trace, where the operator's structure
        # is the final one; inside `jax.shard_map` a traced structure carries
        # the varying axes, which the trace of the solve finds.
        if not no_active_trace():
            return None
        # (Through the class: an Equinox module's bound method is a new module.)
        return strip_weak_dtype(type(self.operator).in_structure(self.operator))
