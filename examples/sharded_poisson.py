"""Solve a 2-D Poisson problem sharded over many devices.

The grid is split into blocks of rows, one per device of a 1-D mesh; the operator's
`mv` exchanges the boundary rows between neighbouring devices (`shard_map` and
`jax.lax.ppermute`), and lineax's Krylov solvers reduce their inner products across
devices. Run as is, it simulates 8 CPU devices. The same code runs on many hosts
(one process per host) after `jax.distributed.initialize()`:

    import jax
    jax.distributed.initialize()  # coordinator address etc. from the environment
    mesh = Mesh(np.array(jax.devices()), ("x",))  # every host's devices
    # ... the rest as below; build `b` with `jax.make_array_from_callback` so that
    # each host only creates its own rows.
"""

import os
import sys


# The device count is fixed when JAX starts: set it before importing JAX.
if "jax" not in sys.modules and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import lineax as lx  # noqa: E402


devices = jax.device_count()
# `Mesh` axes are "auto" (XLA propagates shardings); see the docs page for
# `jax.make_mesh`, whose axes are "explicit" by default.
mesh = Mesh(np.array(jax.devices()), ("x",))
cols, rows = 64, 16 * devices  # 16 grid rows per device
h = 1.0 / (cols + 1)


def halo_poisson(x):
    """`-Laplacian(u) h^2` on this device's rows (Dirichlet boundary): the rows
    just above and below come from the neighbouring devices."""
    u = x.reshape(-1, cols)
    down = [(i, i + 1) for i in range(devices - 1)]
    up = [(i + 1, i) for i in range(devices - 1)]
    above = jax.lax.ppermute(u[-1], "x", down)  # zeros on the first device
    below = jax.lax.ppermute(u[0], "x", up)  # zeros on the last device
    ext = jnp.pad(jnp.concatenate([above[None], u, below[None]]), ((0, 0), (1, 1)))
    out = 4 * u - ext[:-2, 1:-1] - ext[2:, 1:-1] - ext[1:-1, :-2] - ext[1:-1, 2:]
    return out.reshape(-1)


# The `mv` contract: it takes and returns a vector sharded like the right-hand side
# (here `P("x")`), and is linear (lineax transposes it for reverse mode).
mv = jax.shard_map(halo_poisson, mesh=mesh, in_specs=P("x"), out_specs=P("x"))
operator = lx.FunctionLinearOperator(
    mv, jax.ShapeDtypeStruct((rows * cols,), jnp.float32), lx.positive_semidefinite_tag
)
sharding = NamedSharding(mesh, P("x"))
y, x = np.meshgrid(
    np.arange(1, rows + 1) * h, np.arange(1, cols + 1) * h, indexing="ij"
)
source = (np.sin(np.pi * x) * np.sin(np.pi * y) * h**2).astype(np.float32)
b = jax.device_put(jnp.asarray(source.reshape(-1)), sharding)

for solver in (lx.CG(rtol=1e-5, atol=1e-5), lx.PipelinedCG(rtol=1e-5, atol=1e-5)):

    @jax.jit
    def solve(b, solver=solver):
        sol = lx.linear_solve(operator, b, solver, throw=False)
        return sol.value, sol.result, sol.stats["num_steps"]

    start = time.perf_counter()
    value, result, steps = jax.block_until_ready(solve(b))
    seconds = time.perf_counter() - start
    print(
        f"{type(solver).__name__}: {int(steps)} steps on {devices} devices, "
        f"successful={bool(result == lx.RESULTS.successful)}, "
        f"solution sharded as {value.sharding.spec}, {seconds:.1f} s "
        "(compile included)"
    )


# The same problem on one device, with the stencil written for the whole grid, has
# the same answer (within what the tolerance allows: float32, cond(A) ~ 7000).
def grid_poisson(x):
    ext = jnp.pad(x.reshape(rows, cols), 1)
    out = 4 * ext[1:-1, 1:-1] - ext[:-2, 1:-1] - ext[2:, 1:-1]
    return (out - ext[1:-1, :-2] - ext[1:-1, 2:]).reshape(-1)


single = lx.FunctionLinearOperator(
    grid_poisson, operator.in_structure(), lx.positive_semidefinite_tag
)
ref = jax.jit(lambda v: lx.linear_solve(single, v, lx.CG(rtol=1e-5, atol=1e-5)).value)(
    jax.device_put(b, jax.devices()[0])
)
error = (
    np.abs(np.asarray(value) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max()
)
print(f"one device: largest relative difference {error:.1e}")
