"""Weak scaling of sharded Krylov solves on simulated CPU devices: a 2-D Poisson
problem with a fixed number of grid rows per device, on 1, 2, 4 and 8 devices, and
the collectives per iteration read from the compiled HLO.

Run: `PYTHONPATH=src python benchmarks/sharded.py` (sets
`--xla_force_host_platform_device_count=8` itself). Writes
`benchmarks/results/sharded/table.md`. Simulated devices share the host's cores,
so the times show the cost of the communication pattern, not a real speed-up.
"""

import os
import sys


if "jax" not in sys.modules and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


jax.config.update("jax_enable_x64", True)

import lineax as lx  # noqa: E402


COLS = 128
ROWS_PER_DEVICE = 16
COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all")
OUT = pathlib.Path(__file__).parent / "results" / "sharded"


def poisson_halo(mesh, rows):
    devices = mesh.devices.size
    down = [(i, i + 1) for i in range(devices - 1)]
    up = [(i + 1, i) for i in range(devices - 1)]

    def local(x):
        u = x.reshape(-1, COLS)
        above = jax.lax.ppermute(u[-1], "x", down)
        below = jax.lax.ppermute(u[0], "x", up)
        ext = jnp.concatenate([above[None], u, below[None]], axis=0)
        ext = jnp.pad(ext, ((0, 0), (1, 1)))
        out = 4 * u - ext[:-2, 1:-1] - ext[2:, 1:-1] - ext[1:-1, :-2] - ext[1:-1, 2:]
        return out.reshape(-1)

    return jax.shard_map(local, mesh=mesh, in_specs=P("x"), out_specs=P("x"))


def solvers():
    tol = 1e-8
    return {
        "CG": lx.CG(rtol=tol, atol=tol),
        "PipelinedCG": lx.PipelinedCG(rtol=tol, atol=tol),
        "MINRES": lx.MINRES(rtol=tol, atol=tol),
        "GMRES": lx.GMRES(rtol=tol, atol=tol, restart=20),
        "BiCGStab": lx.BiCGStab(rtol=tol, atol=tol),
        "LSMR": lx.LSMR(rtol=tol, atol=tol),
    }


def _computations(hlo: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            name = head.group(1)
            comps[name] = []
        elif name is not None and line.startswith(" "):
            comps[name].append(line)
    return comps


def collectives_per_step(hlo: str) -> dict[str, int]:
    """Collectives in the body of the innermost `while` (one solver step), counting
    those in the computations it calls (conditionals), but not in nested loops."""
    comps = _computations(hlo)
    bodies = {}
    for lines in comps.values():
        for line in lines:
            m = re.search(r" while\(.*body=%?([\w.\-]+)", line)
            if m:
                bodies[m.group(1)] = True

    def called(name, seen):
        out = []
        for line in comps.get(name, []):
            if " while(" in line:
                continue
            for callee in re.findall(
                r"(?:branch_computations=\{|calls=|to_apply=|, )%([\w.\-]+)", line
            ):
                if callee in comps and callee not in seen:
                    seen.add(callee)
                    out.append(callee)
                    out += called(callee, seen)
        return out

    def has_inner_loop(name):
        return any(
            " while(" in line
            for c in [name, *called(name, {name})]
            for line in comps.get(c, [])
        )

    innermost = [b for b in bodies if not has_inner_loop(b)]
    counts = {op: 0 for op in COLLECTIVES}
    for body in innermost[:1]:
        for c in [body, *called(body, {body})]:
            for line in comps[c]:
                for op in COLLECTIVES:
                    if f" {op}(" in line or f" {op}-start(" in line:
                        counts[op] += 1
    return counts


def main():
    rows = []
    all_devices = jax.devices()
    for name, solver in solvers().items():
        for devices in (1, 2, 4, 8):
            if devices > len(all_devices):
                continue
            mesh = Mesh(np.array(all_devices[:devices]), ("x",))
            n_rows = ROWS_PER_DEVICE * devices
            size = n_rows * COLS
            mv = poisson_halo(mesh, n_rows)
            op = lx.FunctionLinearOperator(
                mv,
                jax.ShapeDtypeStruct((size,), jnp.float64),
                lx.positive_semidefinite_tag,
            )
            i = np.arange(size)
            b = jax.device_put(
                jnp.asarray(1 + np.sin(0.1 * i)), NamedSharding(mesh, P("x"))
            )

            def solve(b, op=op, solver=solver):
                sol = lx.linear_solve(op, b, solver, throw=False)
                return sol.value, sol.stats["num_steps"]

            solve = jax.jit(solve)
            start = time.perf_counter()
            compiled = solve.lower(b).compile()
            compile_s = time.perf_counter() - start
            counts = collectives_per_step(compiled.as_text())
            jax.block_until_ready(compiled(b))
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                x, steps = jax.block_until_ready(compiled(b))
                best = min(best, time.perf_counter() - start)
            steps = int(steps)
            rows.append(
                (
                    name,
                    devices,
                    size,
                    steps,
                    1e6 * best / max(steps, 1),
                    compile_s,
                    counts["all-reduce"],
                    counts["collective-permute"],
                    counts["all-gather"],
                )
            )
            print(rows[-1], flush=True)
    header = (
        "| solver | devices | unknowns | steps | run time per step (µs) | compile (s) "
        "| all-reduce per step | collective-permute per step | all-gather per step |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.0f} | {r[5]:.1f} "
        f"| {r[6]} | {r[7]} | {r[8]} |\n"
        for r in rows
    )
    OUT.mkdir(parents=True, exist_ok=True)
    note = (
        f"Weak scaling: {ROWS_PER_DEVICE} x {COLS} grid points per device, float64, "
        "tolerance 1e-8, simulated CPU devices "
        f"(`--xla_force_host_platform_device_count=8`, {os.cpu_count()} cores). "
        "Collectives counted in the compiled HLO of the innermost loop body (one "
        "step; GMRES: one Arnoldi step). On 1 device the `collective-permute`s "
        "of the halo exchange have no source-target pairs (no traffic). The "
        "machine was shared by several processes: run times are noisy; the "
        "collective counts are exact.\n\n"
    )
    (OUT / "table.md").write_text(note + header + body)
    print(header + body)


if __name__ == "__main__":
    main()
