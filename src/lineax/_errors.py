"""`error_if_everywhere`: a run-time error (`throw=True`) that is raised on every
device of a sharded program, and leaves the checked value where it is.

`equinox.internal.branched_error_if` raises from a host callback inside a
`lax.cond` that carries the checked value. In a program partitioned by XLA's SPMD
partitioner (`jax.jit` over arrays sharded on a mesh), JAX gives that callback a
"maximal" sharding: it runs on device 0 only (`jax/_src/callback.py`,
`_callback_op_sharding`). Two things follow:

- the checked value (a solution sharded like its right-hand side) is gathered to
  device 0 and scattered back, XLA warns "Involuntary full rematerialization", and
  the solution comes back replicated;
- when the callback raises, device 0 stops, while the other devices go on to the
  next collective of the program and wait there for device 0. XLA's CPU runtime
  aborts the whole process after 40 s ("rendezvous.cc: Termination timeout ...
  only 7 of 8 arrived"); on GPU the process hangs.

Here the callback gets a *replicated* sharding, so every device runs it (the
predicate is a replicated scalar, the same on every device) and every device raises
at the same point of the program: none is left waiting in a collective, the
exception reaches Python and the devices are free. Only that scalar goes through
the callback; the checked value is tied to it by an elementwise `where`, so the
value stays sharded as it was, and nothing that uses it runs before the check.
The callback is a `lax.cond` branch, so a solve that succeeds makes no host call.

XLA refuses side-effecting custom calls with a replicated sharding, so the callback
is declared free of side effects; its output is used, so it is never removed.
"""

import inspect
from collections.abc import Callable, Sequence

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.core
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

# JAX and Equinox internals (the same ones `equinox.error_if` builds on): where to
# run a host callback is not public API.
from equinox import _jit as _eqx_jit
from equinox._config import EQX_ON_ERROR
from equinox._errors import _EquinoxRuntimeError
from jax._src import (
    callback as _callback,
    config as _config,
    sharding_impls as _sharding_impls,
)
from jax._src.interpreters import batching as _batching, mlir as _mlir
from jax._src.lib import xla_client as _xc  # pyright: ignore[reportPrivateImportUsage]
from jax.extend.core import Primitive
from jaxtyping import Array, ArrayLike, PyTree

from ._misc import lowering_for_export, manual_axes, select, varying_axes
from ._solution import concrete_value


def _find_switch_internal() -> Callable | None:
    """JAX's `lax.switch` without its clamp of the index (see `branch_on_code`),
    where this version of JAX has it with the signature used here; else `None`
    (then `branch_on_code` uses `lax.cond`: the same result, one scalar kernel
    more). Checked once, at import: a private function may change between JAX
    versions, and a changed signature must not break every solve."""
    try:
        from jax._src.lax.control_flow.conditionals import (
            _switch_internal,  # pyright: ignore[reportAttributeAccessIssue]
        )

        parameters = inspect.signature(_switch_internal).parameters
    except (ImportError, TypeError, ValueError):  # pragma: no cover
        return None
    if list(parameters) != ["index", "branches", "operands", "branches_platforms"]:
        return None  # pragma: no cover
    return _switch_internal


_switch_internal = _find_switch_internal()


# JAX marks an unbatched operand or output of a batching rule with `None`.
_not_mapped = None


def _raise(messages: Sequence[str], index, where: str = "") -> None:
    message = messages[int(np.asarray(index))] + where
    # What `equinox.filter_jit` reads to re-raise an `EquinoxRuntimeError` with the
    # message alone (as for `equinox.error_if`).
    _eqx_jit.last_error_info = (message, [])
    raise _EquinoxRuntimeError(message)


def _host_index(operands, *, index_fn: Callable, batch: tuple) -> tuple[int, str]:
    """The largest `index_fn(*element)` over the batch elements of `operands`, on
    the host; and, under `vmap`, a sentence saying which elements failed
    (nonzero), for the message.

    `batch` is `(batch_shape, present)`: the sizes of the enclosing `vmap`s,
    outermost first, and for each operand which of them it has, as leading
    dimensions in that order. An operand without one is broadcast along it
    here, as a NumPy view, not copied on the device: an unbatched operator's
    matrix is not made into a batch of matrices to raise an error."""
    batch_shape, present = batch
    operands = [np.asarray(x) for x in operands]
    if not batch_shape:
        return int(index_fn(*operands)), ""
    batch_ndim = len(batch_shape)
    expanded = []
    for x, has in zip(operands, present):
        core = x.shape[sum(has) :]
        sizes = [size if h else 1 for size, h in zip(batch_shape, has)]
        expanded.append(
            np.broadcast_to(x.reshape(*sizes, *core), (*batch_shape, *core))
        )
    operands = expanded
    codes = {
        i: int(index_fn(*(x[i] for x in operands))) for i in np.ndindex(*batch_shape)
    }
    failed = [i[0] if batch_ndim == 1 else i for i, code in codes.items() if code]
    if not failed:
        return 0, ""
    shown = ", ".join(str(i) for i in failed[:_SHOWN])
    more = ", ..." if len(failed) > _SHOWN else ""
    where = (
        f" (Under `vmap`: {len(failed)} of {len(codes)} batch elements failed, at "
        f"index {shown}{more}.)"
    )
    if len({code for code in codes.values() if code}) > 1:
        where += (
            " Some failed differently, and this message is for one of them: solve "
            "with `throw=False` to read each element's `result`."
        )
    return max(codes.values()), where


# How many failed batch elements a message lists.
_SHOWN = 5


def _host_check(*operands, messages, index_fn, batch, raises) -> np.ndarray:
    index, where = _host_index(operands, index_fn=index_fn, batch=batch)
    if not raises:
        return np.asarray(index, np.int32)
    if index != 0:
        _raise(messages, index, where)
    return np.zeros((), np.int32)


# `_raise_p.bind(*operands, messages, index_fn, batch, raises)`: raise
# `messages[index]` for the largest nonzero `index = index_fn(*element)` over the
# batch, on the host; returns a zero (int32 scalar) to tie the checked value to.
# With `raises=False`, returns that index instead (see `raise_everywhere`).
# Under `vmap` the batch dimensions are moved to the front of every batched
# operand (see `_raise_batch`; `batch` records which operand has which), so that
# one host call examines the whole batch.
_raise_p = Primitive("lineax_raise_everywhere")


def _raise_impl(*operands, messages, index_fn, batch, raises):
    try:
        out = _host_check(
            *operands, messages=messages, index_fn=index_fn, batch=batch, raises=raises
        )
    except _EquinoxRuntimeError as error:
        # Run eagerly, not in a compiled program's callback (whose error
        # `equinox.filter_jit` raises again as its public one): raised as that
        # public error, which users catch, with the message alone.
        raise eqx.EquinoxRuntimeError(str(error)) from None
    return jnp.asarray(out)


def _raise_abstract_eval(*operands, messages, index_fn, batch, raises):
    del operands, messages, index_fn, batch, raises
    return jax.core.ShapedArray((), jnp.int32)


def _raise_batch(operands, dims, *, messages, index_fn, batch, raises):
    size = next(x.shape[d] for x, d in zip(operands, dims) if d is not _not_mapped)
    batch_shape, present = batch
    # (An unbatched operand is left as it is, and broadcast on the host.)
    operands = [
        x if d is _not_mapped else jnp.moveaxis(x, d, 0) for x, d in zip(operands, dims)
    ]
    present = tuple((d is not _not_mapped, *has) for d, has in zip(dims, present))
    out = _raise_p.bind(
        *operands,
        messages=messages,
        index_fn=index_fn,
        batch=((size, *batch_shape), present),
        raises=raises,
    )
    return out, _not_mapped


_raise_p.def_impl(_raise_impl)
_raise_p.def_abstract_eval(_raise_abstract_eval)
_batching.primitive_batchers[_raise_p] = _raise_batch


def _replicated_sharding(ctx):
    """The callback's sharding: replicated under automatic partitioning (every
    device runs it); JAX's own choice otherwise (per device inside `shard_map`,
    none without partitioning)."""
    axis_context = ctx.module_context.axis_context
    if isinstance(axis_context, _sharding_impls.ShardingContext):
        if _config.use_shardy_partitioner.value:
            return _callback._get_sdy_array_list_for_callbacks(ctx.avals_out)
        sharding = _xc.OpSharding()
        sharding.type = _xc.OpSharding.Type.REPLICATED
        return sharding
    return _callback._callback_op_sharding(axis_context, None, ctx.avals_out)


def _partitioned(ctx) -> bool:
    """Whether the program is partitioned over several devices by XLA."""
    axis_context = ctx.module_context.axis_context
    return (
        isinstance(axis_context, _sharding_impls.ShardingContext)
        and axis_context.num_devices > 1
    )


def _raise_lowering(ctx, *operands, messages, index_fn, batch, raises):
    if lowering_for_export(ctx):
        # JAX's own error ("serialization of host_callbacks is not yet
        # implemented") names neither the solve nor what to do.
        raise ValueError(
            "`linear_solve(..., throw=True)` (the default, also of `lineax.invert`) "
            "cannot be exported with `jax.export`: raising its error at run time "
            "needs a host callback, which an exported program cannot hold. Pass "
            "`throw=False` and check `Solution.result` instead."
        )

    def callback(*values):
        out = _host_check(
            *values, messages=messages, index_fn=index_fn, batch=batch, raises=raises
        )
        return (out,)

    # On one device the callback is declared side-effecting, so that XLA keeps it
    # although nothing reads its output (`_tie_p` is then the identity). XLA
    # refuses a side-effecting callback with a replicated sharding: in a
    # partitioned program it is free of side effects and `_tie_p` reads it.
    partitioned = _partitioned(ctx)
    result, _, _ = _callback.emit_python_callback(
        ctx,
        callback,
        None,
        list(operands),
        ctx.avals_in,
        ctx.avals_out,
        has_side_effect=not partitioned,
        returns_token=False,
        sharding=_replicated_sharding(ctx),
    )
    return result


_mlir.register_lowering(_raise_p, _raise_lowering, cacheable=False)


def raise_everywhere(
    x: PyTree[Array],
    operands: Sequence[Array],
    messages: Sequence[str],
    index_fn: Callable[..., int],
) -> PyTree[Array]:
    """`x`, after raising `messages[index]` at run time if `index =
    index_fn(*operands)`, evaluated on the host with NumPy, is not zero.

    For use inside a branch that is taken only when there is an error (a solve
    that failed): one host call (no conditional of its own) that both finds the
    message and raises, on every device (see the module docstring). Under
    `vmap`, `index_fn` is called for each batch element and the largest index is
    raised. Nothing is computed in the graph: the operands are handed over as
    they are.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.manual_axes and set(mesh.manual_axes) != set(mesh.axis_names):
        # JAX refuses it at lowering, with a message that names no solve.
        raise ValueError(
            "`linear_solve(..., throw=True)` (the default) inside a "
            "`jax.shard_map` over some of the mesh's axes (`axis_names=`) is not "
            "supported: raising the error needs a host callback, which JAX "
            "supports there only when every mesh axis is manual. Pass "
            "`throw=False` and check `Solution.result`, or make every axis of "
            "the mesh manual."
        )
    operands = [jnp.asarray(x) for x in operands]
    if EQX_ON_ERROR != "raise":
        # Equinox's error modes (NaN, breakpoint, ...): the index in the graph.
        index = jax.pure_callback(
            lambda *xs: np.asarray(index_fn(*xs), np.int32),
            jax.ShapeDtypeStruct((), jnp.int32),
            *operands,
            vmap_method="sequential",
        )
        return eqxi.branched_error_if(x, index != 0, index, messages)
    messages = tuple(messages)
    batch = ((), ((),) * len(operands))
    axes = manual_axes()
    if axes:
        # Inside `jax.shard_map` each device's callback examines its own part of
        # the inputs, and a device whose part succeeded would not raise: it
        # would go on to the program's next collective and wait there for the
        # device that raised, until XLA aborts the process (on GPU: a hang). So
        # each device finds its own index on the host, the largest over the
        # devices is taken (one all-reduce, in the error branch only), and every
        # device raises its message. (Per device, `vmap`'s element indices
        # would be local to the device: the message names none.)
        local = _raise_p.bind(
            *operands, messages=messages, index_fn=index_fn, batch=batch, raises=False
        )
        operands = [_max_over_devices(local, axes)]
        index_fn, batch = _same_index, ((), ((),))
    checked = _raise_p.bind(
        *operands, messages=messages, index_fn=index_fn, batch=batch, raises=True
    )
    return _tied(x, checked)


def _max_over_devices(index: Array, axes: tuple) -> Array:
    """The largest of the int32 scalar `index` over the devices of the manual
    mesh `axes`, the same on every device.

    With `check_vma=True` a value typed as invariant over an axis is reduced as
    a constant (no communication): `index` is cast to varying over every axis
    first, as a value computed by a callback on each device is. (With
    `check_vma=False` the cast does nothing, and the types say nothing, so that
    every axis is reduced over.)"""
    missing = tuple(a for a in axes if a not in varying_axes(index))
    if missing:
        index = lax.pcast(index, missing, to="varying")
    return lax.pmax(index, axes)


def _same_index(index):
    return index


def _on_any_device(pred: Array) -> Array:
    """The boolean scalar `pred` made true on every device of the enclosing
    `jax.shard_map`s if it is true on any (see `branch_on_code`)."""
    axes = manual_axes()
    if not axes:
        return pred
    return _max_over_devices(pred.astype(jnp.int32), axes) != 0


def error_if_everywhere(
    x: PyTree[Array], pred: Array, index: Array, messages: Sequence[str]
) -> PyTree[Array]:
    """`x`, after raising `messages[index]` at run time where `pred` is true.

    A drop-in replacement for `equinox.internal.branched_error_if(x, pred, index,
    messages)` that also works in sharded programs (see the module docstring).
    Under `vmap`, it raises if any element fails, with the largest index.
    """
    if EQX_ON_ERROR != "raise":
        return eqxi.branched_error_if(x, pred, index, messages)
    pred = jnp.asarray(pred)
    index = select(pred, jnp.asarray(index, jnp.int32), 0)
    return lax.cond(
        _on_any_device(eqxi.unvmap_any(pred)),
        lambda x, i: raise_everywhere(x, [i], messages, _same_index),
        lambda x, i: x,
        x,
        index,
    )


def branch_on_code(
    code: ArrayLike, if_nonzero: Callable, if_zero: Callable, operand: PyTree[Array]
) -> PyTree[Array]:
    """`if_nonzero(operand)` if the nonnegative int32 scalar `code` is not zero
    (under `vmap`: for any element), else `if_zero(operand)`.

    The conditional branches on `code` itself, as an index: XLA runs the last
    branch for an index past the end. (`lax.cond` branches on a boolean made
    from it, and `lax.switch` on a clamped copy: either is a scalar kernel of its
    own next to the one computing `code`, when `code` is also used elsewhere.)
    """
    concrete = concrete_value(code)
    if concrete is not None:
        # A concrete code (eagerly, or under `jax.disable_jit`, where JAX's switch
        # would index its branches with it directly): branch in Python. Read on
        # the host: `np.max` of a JAX array calls its `.max()`, a traced
        # operation when this runs while a solve is being lowered, so that a
        # user's solver returning a constant failure (`RESULTS.singular`) raised
        # a ConcretizationTypeError under `jax.jit` instead of its message.
        return (if_zero if int(np.max(concrete)) == 0 else if_nonzero)(operand)
    index = _unvmap_max_p.bind(jnp.asarray(code, jnp.int32))
    axes = manual_axes()
    if axes:
        # Inside `jax.shard_map`: every device takes the branch if any device
        # failed, so that all of them reach its host callback (see
        # `raise_everywhere`). One all-reduce of a scalar per solve.
        index = _max_over_devices(index, axes)
    if _switch_internal is None:  # (not in this version of JAX)
        return lax.cond(index != 0, if_nonzero, if_zero, operand)
    return _switch_internal(
        index, (if_zero, if_nonzero), (operand,), branches_platforms=None
    )


# `eqxi.unvmap_max`, with 0 as the largest of no elements: under `vmap` over zero
# elements that one took `jnp.max` of an empty array, and every solve with
# `throw=True` failed to trace ("zero-size array to reduction operation max").
_unvmap_max_p = Primitive("lineax_unvmap_max")


def _unvmap_max_impl(x):
    return jnp.max(x) if x.size else jnp.zeros((), x.dtype)


def _unvmap_max_batch(args, dims):
    del dims
    return _unvmap_max_p.bind(*args), _not_mapped


_unvmap_max_p.def_impl(_unvmap_max_impl)
_unvmap_max_p.def_abstract_eval(lambda x: jax.core.ShapedArray((), x.dtype))
_batching.primitive_batchers[_unvmap_max_p] = _unvmap_max_batch
_unvmap_max_lowering = _mlir.lower_fun(_unvmap_max_impl, multiple_results=False)


def _unvmap_max_lower(ctx, x):
    # Unbatched (a scalar), the largest of one element is itself: no reduction
    # to trace and lower.
    if ctx.avals_in[0].ndim == 0:
        return [x]
    return _unvmap_max_lowering(ctx, x)


_mlir.register_lowering(_unvmap_max_p, _unvmap_max_lower)


def _tied(x: PyTree[Array], checked: Array) -> PyTree[Array]:
    """`x`, made to depend on `checked` (the callback's output) where that is
    needed to keep the callback: see `_tie_p`."""
    leaves, treedef = jtu.tree_flatten(x)
    return jtu.tree_unflatten(treedef, _tie_p.bind(checked, *leaves))


# `_tie_p.bind(checked, *leaves)` is `leaves`. Lowered in a partitioned program as
# `where(checked >= 0, leaf, 0)`: `checked` is zero, but XLA cannot know it, so
# each leaf depends on the check (an optimisation barrier does not keep the check
# alive, as XLA removes the barrier and then the unused callback). On one device
# the callback is side-effecting (see `_raise_lowering`) and this is the
# identity: no elementwise kernel to compile in the error branch.
_tie_p = Primitive("lineax_tie")
_tie_p.multiple_results = True


def _tie_impl(checked, *leaves):
    del checked
    return list(leaves)


def _tie_abstract_eval(checked, *leaves):
    del checked
    return list(leaves)


def _tie_batch(operands, dims):
    checked, *leaves = operands
    if dims[0] is not _not_mapped:
        checked = jnp.max(checked)
    return _tie_p.bind(checked, *leaves), list(dims[1:])


def _where_ok(checked, *leaves):
    ok = checked >= 0
    return [jnp.where(ok, leaf, jnp.zeros_like(leaf)) for leaf in leaves]


_where_ok_lowering = _mlir.lower_fun(_where_ok, multiple_results=True)


def _tie_lowering(ctx, checked, *leaves):
    if _partitioned(ctx):
        return _where_ok_lowering(ctx, checked, *leaves)
    return list(leaves)


_tie_p.def_impl(_tie_impl)
_tie_p.def_abstract_eval(_tie_abstract_eval)
_batching.primitive_batchers[_tie_p] = _tie_batch
_mlir.register_lowering(_tie_p, _tie_lowering)
