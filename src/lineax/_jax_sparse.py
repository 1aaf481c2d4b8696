"""`jax.experimental.sparse`, imported so that `EQX_ON_ERROR=breakpoint` works.

In that mode Equinox replaces `jax.jit` (as a workaround for JAX issue #16732)
by a wrapper that takes the function first, and `jax.experimental.sparse`
decorates its functions with `@jax.jit(static_argnames=...)` at import: once
Equinox was imported, `import lineax` failed with `TypeError: jit() missing 1
required positional argument: 'fun'` (lineax 0.1.1, which does not import it,
imported). The module is imported with JAX's own `jit` in place: its functions
are then ordinary `jax.jit`s, as without the flag.
"""

import jax
from equinox import _errors as _eqx_errors


_original_jit = getattr(_eqx_errors, "_old_jit", None)
if _original_jit is not None and jax.jit is not _original_jit:
    _patched_jit, jax.jit = jax.jit, _original_jit
    try:
        from jax.experimental import sparse as jsparse
    finally:
        jax.jit = _patched_jit
else:
    from jax.experimental import sparse as jsparse

__all__ = ["jsparse"]
