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

    python benchmarks/preconditioners.py --suite sparse [--sizes 128 256]

runs the incomplete factorisations on stored sparse matrices instead (see
`run_sparse`): CG on 2-D Poisson with IC(0), and GMRES(20) on 2-D
convection-diffusion with ILU(0), each against no preconditioner. Writes
`benchmarks/results/preconditioners/table-sparse.md`.
"""

import argparse
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jax.experimental import sparse as jsparse

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
    parser.add_argument("--suite", choices=["matrix-free", "sparse"])
    args = parser.parse_args()
    if args.suite == "sparse":
        run_sparse(args.sizes, args.reps)
        return
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


#
# Incomplete factorisations of stored sparse matrices.
#


def poisson_matrix(n: int) -> sp.csr_matrix:
    """The 5-point Laplacian on an n × n grid (times h²), zero Dirichlet boundary."""
    t = sp.csr_matrix(2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1))
    eye = sp.eye_array(n)
    return sp.csr_matrix(sp.kron(t, eye) + sp.kron(eye, t))


def convection_diffusion_matrix(n: int, wind: float) -> sp.csr_matrix:
    """`-Δu + wind·(∂x + ∂y)u` on the unit square, n × n interior points, central
    differences (times h²): nonsymmetric, with mesh Péclet number `wind·h/2`."""
    h = 1.0 / (n + 1)
    c = sp.csr_matrix(np.eye(n, k=1) - np.eye(n, k=-1))
    eye = sp.eye_array(n)
    convection = wind * h / 2 * (sp.kron(c, eye) + sp.kron(eye, c))
    return sp.csr_matrix(poisson_matrix(n) + convection)


def make_sparse_solve(matrix: sp.csr_matrix, solver, which: str, tags):
    """A jitted solve taking the matrix's values and the right-hand side; the index
    arrays are closed over, so the preconditioner's symbolic setup (elimination
    stages, levels) runs once at trace time and its numeric factorisation runs
    inside the jitted function, in the run time."""
    indices = jnp.asarray(matrix.indices)
    indptr = jnp.asarray(matrix.indptr)
    size = len(matrix.indptr) - 1
    shape = (size, size)

    def solve(data, b):
        bcsr = jsparse.BCSR((data, indices, indptr), shape=shape)
        operator = lx.SparseLinearOperator(bcsr, tags)
        if which == "none":
            options = {}
        elif which == "ic(0)":
            options = {"preconditioner": lx.IncompleteCholeskyPreconditioner(operator)}
        elif which == "ilu(0)":
            options = {"preconditioner": lx.ILUPreconditioner(operator)}
        else:
            raise ValueError(which)
        sol = lx.linear_solve(operator, b, solver, options=options, throw=False)
        residual = jnp.max(jnp.abs(operator.mv(sol.value) - b)) / jnp.max(jnp.abs(b))
        ok = sol.result == lx.RESULTS.successful
        return residual, sol.stats["num_steps"], ok

    return jax.jit(solve)


def run_sparse(sizes: list[int], reps: int) -> None:
    rows = []
    for n in sizes:
        rng = np.random.default_rng(n)
        b = jnp.asarray(rng.normal(size=n * n), jnp.float32)
        problems = [
            (
                "Poisson, CG",
                poisson_matrix(n),
                lx.CG(rtol=1e-5, atol=0.0, max_steps=20 * n),
                ["none", "ic(0)"],
                lx.positive_semidefinite_tag,
            ),
            (
                "conv.-diff. (wind 100), GMRES(20)",
                convection_diffusion_matrix(n, 100.0),
                lx.GMRES(rtol=1e-5, atol=0.0, restart=20, max_steps=100 * n),
                ["none", "ilu(0)"],
                (),
            ),
        ]
        for problem, matrix, solver, methods, tags in problems:
            data = jnp.asarray(matrix.data, jnp.float32)
            group = []
            for which in methods:
                fn = make_sparse_solve(matrix, solver, which, tags)
                t0 = time.perf_counter()
                compiled = fn.lower(data, b).compile()
                compile_s = time.perf_counter() - t0
                residual, steps, ok = compiled(data, b)
                group.append(
                    dict(
                        n=n,
                        problem=problem,
                        which=which,
                        steps=int(steps),
                        ok=bool(ok),
                        residual=float(residual),
                        compile_s=compile_s,
                        compiled=compiled,
                        data=data,
                        times=[],
                    )
                )
            for _ in range(reps):
                for row in group:
                    t0 = time.perf_counter()
                    jax.block_until_ready(row["compiled"](row["data"], b))
                    row["times"].append(time.perf_counter() - t0)
            for row in group:
                row["run_s"] = statistics.median(row["times"])
                print(
                    f"{n:4d}² {problem} {row['which']:>7s}: {row['steps']:5d} steps, "
                    f"converged={row['ok']}, rel. residual {row['residual']:.1e}, "
                    f"compile {row['compile_s']:.2f} s, run "
                    f"{row['run_s'] * 1e3:.1f} ms",
                    flush=True,
                )
            rows.extend(group)

    device = jax.devices()[0].device_kind
    lines = [
        "Stored sparse matrices (BCSR), float32, rtol 1e-5 (max norm), random "
        f"right-hand side; device: {device}; run time is the median of {reps} and "
        "includes the numeric factorisation (its symbolic setup is in the compile "
        "time).",
        "",
        "| grid | problem, solver | preconditioner | steps | converged | "
        "residual / rhs (max) | compile (s) | run (ms) | fewer steps | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = next(
            r
            for r in rows
            if r["n"] == row["n"] and r["problem"] == row["problem"]
            if r["which"] == "none"
        )
        lines.append(
            f"| {row['n']}² | {row['problem']} | {row['which']} | {row['steps']} | "
            f"{'yes' if row['ok'] else 'no'} | {row['residual']:.1e} | "
            f"{row['compile_s']:.2f} | {row['run_s'] * 1e3:.1f} | "
            f"{base['steps'] / max(row['steps'], 1):.1f}× | "
            f"{base['run_s'] / row['run_s']:.1f}× |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "table-sparse.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
