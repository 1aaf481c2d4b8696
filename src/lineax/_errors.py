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

from collections.abc import Sequence

import equinox.internal as eqxi
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
from jax._src.interpreters import mlir as _mlir
from jax._src.lib import xla_client as _xc  # pyright: ignore[reportPrivateImportUsage]
from jax.extend.core import Primitive
from jaxtyping import Array, PyTree


def _raise(messages: Sequence[str], index) -> None:
    message = messages[int(np.asarray(index))]
    # What `equinox.filter_jit` reads to re-raise an `EquinoxRuntimeError` with the
    # message alone (as for `equinox.error_if`).
    _eqx_jit.last_error_info = (message, [])
    raise _EquinoxRuntimeError(message)


_raise_p = Primitive("lineax_raise_everywhere")


def _raise_impl(index, *, messages):
    _raise(messages, index)
    return index


def _raise_abstract_eval(index, *, messages):
    del messages
    return index


_raise_p.def_impl(_raise_impl)
_raise_p.def_abstract_eval(_raise_abstract_eval)


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


def _raise_lowering(ctx, index, *, messages):
    def callback(index_value):
        _raise(messages, index_value)
        return (index_value,)

    result, _, _ = _callback.emit_python_callback(
        ctx,
        callback,
        None,
        [index],
        ctx.avals_in,
        ctx.avals_out,
        has_side_effect=False,
        returns_token=False,
        sharding=_replicated_sharding(ctx),
    )
    return result


_mlir.register_lowering(_raise_p, _raise_lowering, cacheable=False)


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
    pred, index = _unbatched(pred, index)
    messages = tuple(messages)
    checked = lax.cond(
        pred, lambda i: _raise_p.bind(i, messages=messages), lambda i: i, index
    )
    return _tied(x, checked)


def raise_everywhere(
    x: PyTree[Array], pred: Array, index: Array, messages: Sequence[str]
) -> PyTree[Array]:
    """As `error_if_everywhere`, for use inside a branch that is only taken when
    `pred` holds for some batch element: it raises unconditionally, with no
    second conditional (which would cost compile time for nothing)."""
    if EQX_ON_ERROR != "raise":
        return eqxi.branched_error_if(x, pred, index, messages)
    _, index = _unbatched(pred, index)
    return _tied(x, _raise_p.bind(index, messages=tuple(messages)))


def _unbatched(pred: Array, index: Array) -> tuple[Array, Array]:
    """`pred` for the whole batch, and the largest failing index in it."""
    pred = jnp.asarray(pred)
    index = eqxi.unvmap_max(jnp.where(pred, index, 0).astype(jnp.int32))
    return eqxi.unvmap_any(pred), index


def _tied(x: PyTree[Array], checked: Array) -> PyTree[Array]:
    # `checked` is `index >= 0`, but XLA cannot know it: each leaf depends on the
    # check (an optimisation barrier does not keep the check alive, as XLA removes
    # the barrier and then the unused callback).
    ok = checked >= 0
    return jtu.tree_map(lambda leaf: jnp.where(ok, leaf, jnp.zeros_like(leaf)), x)
