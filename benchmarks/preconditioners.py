"""CG on the 2-D Poisson equation in float32, without a preconditioner and with
the Jacobi, Chebyshev and multigrid preconditioners: iteration counts, compile time
and run time, side by side in one process.

    python benchmarks/preconditioners.py [--sizes 128 256 512] [--reps 3]

The operator is the 5-point Laplacian on an n × n grid of interior points of the
unit square (zero Dirichlet boundary), matrix-free; the right-hand side is seeded
random noise, and CG stops at `rtol = 1e-5` in the max norm (its default). The
preconditioner is built inside the jitted function, so the run time includes its
setup (probed diagonals, Lanczos, coarse LU). Writes
`benchmarks/results/preconditioners/table-{max,two}.md` (`--norm`).
"""

import argparse
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import lineax as lx


RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "preconditioners"


def laplacian(u, h):
    padded = jnp.pad(u, 1)
    neighbours = (
        padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    )
    return (4 * u - neighbours) / h**2


NORM = "max"


def make_solve(n: int, which: str):
    h = 1.0 / (n + 1)
    struct = jax.ShapeDtypeStruct((n, n), jnp.float32)
    tags = lx.positive_semidefinite_tag

    def stencil(u):
        return laplacian(u, h)

    norm = lx.internal.two_norm if NORM == "two" else lx.internal.max_norm
    solver = lx.CG(rtol=1e-5, atol=0.0, max_steps=20 * n, norm=norm)

    def solve(b):
        operator = lx.FunctionLinearOperator(stencil, struct, tags)
        if which == "none":
            options = {}
        elif which == "jacobi":
            # The operator is matrix-free, so its diagonal is estimated from 8
            # random probes. (The Laplacian's diagonal is constant, so even the
            # exact Jacobi preconditioner only rescales it: no fewer steps.)
            options = {"preconditioner": lx.JacobiPreconditioner(operator, probes=8)}
        elif which == "chebyshev(8)":
            precond = lx.ChebyshevPreconditioner(operator, 8)
            options = {"preconditioner": precond}
        elif which == "multigrid":
            precond = lx.MultigridPreconditioner(
                laplacian, (n, n), h, dtype=jnp.float32, tags=tags
            )
            options = {"preconditioner": precond}
        else:
            raise ValueError(which)
        sol = lx.linear_solve(operator, b, solver, options=options, throw=False)
        return sol.value, sol.stats["num_steps"], sol.result == lx.RESULTS.successful

    return jax.jit(solve), stencil


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--norm", choices=["max", "two"], default="max")
    args = parser.parse_args()
    global NORM
    NORM = args.norm
    methods = ["none", "jacobi", "chebyshev(8)", "multigrid"]
    rows = []
    for n in args.sizes:
        rng = np.random.default_rng(n)
        b = jnp.asarray(rng.normal(size=(n, n)), jnp.float32)
        compiled = {}
        for which in methods:
            fn, stencil = make_solve(n, which)
            t0 = time.perf_counter()
            compiled[which] = fn.lower(b).compile()
            compile_s = time.perf_counter() - t0
            value, steps, ok = compiled[which](b)
            norm = jnp.linalg.norm if NORM == "two" else lambda x: jnp.max(jnp.abs(x))
            residual = float(norm(stencil(value) - b) / norm(b))
            rows.append(
                dict(
                    n=n,
                    which=which,
                    steps=int(steps),
                    ok=bool(ok),
                    residual=residual,
                    compile_s=compile_s,
                    times=[],
                )
            )
        # Interleaved repetitions, so that drift in the machine's load hits all.
        for _ in range(args.reps):
            for row in rows[-len(methods) :]:
                t0 = time.perf_counter()
                jax.block_until_ready(compiled[row["which"]](b))
                row["times"].append(time.perf_counter() - t0)
        for row in rows[-len(methods) :]:
            row["run_s"] = statistics.median(row["times"])
            print(
                f"{n:4d}² {row['which']:>13s}: {row['steps']:5d} steps, "
                f"converged={row['ok']}, rel. residual {row['residual']:.1e}, "
                f"compile {row['compile_s']:.2f} s, run {row['run_s'] * 1e3:.1f} ms",
                flush=True,
            )

    device = jax.devices()[0].device_kind
    lines = [
        f"CG on 2-D Poisson, float32, rtol 1e-5 ({NORM} norm), random right-hand "
        f"side; device: {device}; run time is the median of {args.reps} and "
        "includes building the preconditioner.",
        "",
        f"| grid | preconditioner | CG steps | converged | residual / rhs ({NORM}) "
        "| compile (s) | run (ms) | speed-up vs none |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = next(r for r in rows if r["n"] == row["n"] and r["which"] == "none")[
            "run_s"
        ]
        lines.append(
            f"| {row['n']}² | {row['which']} | {row['steps']} | "
            f"{'yes' if row['ok'] else 'no'} | {row['residual']:.1e} | "
            f"{row['compile_s']:.2f} | {row['run_s'] * 1e3:.1f} | "
            f"{base / row['run_s']:.1f}× |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"table-{NORM}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
