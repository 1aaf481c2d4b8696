"""Structured solves against the dense path, side by side in one process.

    PYTHONPATH=src python benchmarks/structured.py [--x64] [--quick] [--out DIR]

Cases (targets from issue 12):

- Kronecker `A ⊗ B`, two 64×64 factors (n = 4096): `lx.Kronecker` against LU of
  the materialised matrix (target: >= 100x faster, same answer);
- diagonal + rank 10, n = 4000: `lx.Woodbury` against dense LU (target >= 50x);
- block diagonal, 100 blocks of 50×50: `lx.BlockDiagonal` against
  `jax.vmap(jnp.linalg.solve)` (target: parity);
- 2-D Poisson (BCSR, 256² by default, 512² with `--size 512`) with `lx.CG`:
  `lx.SparseLinearOperator` against the matrix-free 5-point stencil
  (target: within 1.2x), built outside `jit` (its diagonal layout) and, with
  no target, built under `jit` from a traced matrix (the general path).

Compile time (lower + XLA compile of a fresh `jax.jit`) and run time (median of
interleaved repetitions) are measured separately, by `_timing.py`. Writes
`table.md` and `results.json` to `--out` (default
`benchmarks/results/structured/`). Never imports from `tests/`.
"""

import argparse
import json
import os
import pathlib
import platform
import sys


HERE = pathlib.Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--x64", action="store_true", help="float64 (default float32)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--size", type=int, default=256, help="Poisson grid side")
    p.add_argument("--kron", type=int, default=64, help="Kronecker factor size")
    p.add_argument("--out", type=pathlib.Path, default=None)
    p.add_argument(
        "--cases",
        default="kronecker,woodbury,block,sparse,sparse-traced",
        help="comma-separated subset of kronecker,woodbury,block,sparse,sparse-traced",
    )
    p.add_argument(
        "--blas-threads",
        default="1",
        help="OPENBLAS_NUM_THREADS for both sides ('' leaves it unset); see below",
    )
    return p.parse_args(argv)


def limit_blas_threads(threads: str) -> None:
    """JAX's CPU LAPACK kernels (LU, triangular solves) call SciPy's OpenBLAS. On a
    machine with more busy threads than cores, OpenBLAS's worker threads make a
    64×64 triangular solve with 64 right-hand sides take 8-30 ms instead of
    0.02 ms, at random; one BLAS thread (for both sides) removes that noise.
    Must be called before NumPy/SciPy/jaxlib load OpenBLAS (hence the imports
    inside the functions below)."""
    if threads:
        os.environ["OPENBLAS_NUM_THREADS"] = threads


def _case(key, name, ours, ours_args, theirs, theirs_args, target):
    return dict(
        key=key,
        name=name,
        ours=ours,
        ours_args=ours_args,
        theirs=theirs,
        theirs_args=theirs_args,
        target=target,
    )


def kronecker_case(normal, m, dtype):
    """lineax solves through the factors; the dense path is LU of the
    materialised product (given as an input, so its formation is not timed)."""
    import jax.numpy as jnp

    import lineax as lx

    a = normal((m, m)) + m**0.5 * 2 * jnp.eye(m, dtype=dtype)
    b = normal((m, m)) + m**0.5 * 2 * jnp.eye(m, dtype=dtype)
    rhs = normal((m * m,))

    def kron_lineax(a, b, rhs):
        op = lx.KroneckerLinearOperator(
            lx.MatrixLinearOperator(a), lx.MatrixLinearOperator(b)
        )
        return lx.linear_solve(op, rhs).value

    return _case(
        "kronecker",
        f"kronecker {m}x{m} (x) {m}x{m}, n={m * m}",
        kron_lineax,
        (a, b, rhs),
        jnp.linalg.solve,
        (jnp.kron(a, b), rhs),
        "ours >= 100x faster",
    )


def woodbury_case(normal, key, dtype, n=4000, k=10):
    """Diagonal + rank `k` against dense LU of the sum."""
    import jax.numpy as jnp
    import jax.random as jr

    import lineax as lx

    d = jr.uniform(key, (n,), dtype, 1.0, 2.0)
    u = normal((n, k)) / n**0.5
    c = normal((k, k))
    v = normal((k, n)) / n**0.5
    rhs = normal((n,))

    def woodbury_lineax(d, u, c, v, rhs):
        op = lx.LowRankUpdateLinearOperator(lx.DiagonalLinearOperator(d), u, c, v)
        return lx.linear_solve(op, rhs).value

    return _case(
        "woodbury",
        f"woodbury diagonal + rank {k}, n={n}",
        woodbury_lineax,
        (d, u, c, v, rhs),
        jnp.linalg.solve,
        (jnp.diag(d) + u @ c @ v, rhs),
        "ours >= 50x faster",
    )


def block_case(normal, dtype, count=100, size=50):
    """`count` blocks of `size`x`size` against `vmap` of LU."""
    import jax
    import jax.numpy as jnp

    import lineax as lx

    blocks = normal((count, size, size)) + 10 * jnp.eye(size, dtype=dtype)
    rhs = normal((count, size))

    def blocks_lineax(blocks, rhs):
        op = lx.BlockDiagonalLinearOperator(
            [lx.MatrixLinearOperator(blocks[i]) for i in range(count)]
        )
        solution = lx.linear_solve(op, tuple(rhs[i] for i in range(count))).value
        return jnp.stack(solution)

    return _case(
        "block",
        f"block diagonal {count} blocks of {size}x{size}",
        blocks_lineax,
        (blocks, rhs),
        jax.vmap(jnp.linalg.solve),
        (blocks, rhs),
        "parity",
    )


def sparse_cases(normal, side, dtype):
    """2-D Poisson (BCSR) against the matrix-free stencil, both by `lx.CG` with the
    same tolerances (so the same iterations): the operator built outside `jit`
    (its diagonal layout), and built under `jit` from a traced matrix."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import scipy.sparse
    from jax.experimental import sparse as jsparse

    import lineax as lx

    one = scipy.sparse.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(side, side))
    eye = scipy.sparse.eye(side)
    poisson = (scipy.sparse.kron(one, eye) + scipy.sparse.kron(eye, one)).tocsr()
    bcsr = jsparse.BCSR.from_scipy_sparse(poisson.astype(np.dtype(dtype)))
    rhs = normal((side * side,))
    solver = lx.CG(rtol=1e-5, atol=1e-5, max_steps=200)
    # Built once, outside `jit`, from the concrete matrix (which finds its
    # diagonals), then passed in as an argument, as one would reuse it.
    sparse_operator = lx.SparseLinearOperator(bcsr, lx.positive_semidefinite_tag)

    def poisson_sparse(op, rhs):
        return lx.linear_solve(op, rhs, solver, throw=False).value

    def poisson_sparse_traced(matrix, rhs):
        # Built under `jit` from a traced matrix: the general gather + segment sum.
        op = lx.SparseLinearOperator(matrix, lx.positive_semidefinite_tag)
        return lx.linear_solve(op, rhs, solver, throw=False).value

    def stencil(x):
        grid = x.reshape(side, side)
        padded = jnp.pad(grid, 1)
        out = (
            4 * grid
            - padded[:-2, 1:-1]
            - padded[2:, 1:-1]
            - padded[1:-1, :-2]
            - padded[1:-1, 2:]
        )
        return out.reshape(-1)

    def poisson_stencil(rhs):
        structure = jax.ShapeDtypeStruct((side * side,), dtype)
        op = lx.FunctionLinearOperator(stencil, structure, lx.positive_semidefinite_tag)
        return lx.linear_solve(op, rhs, solver, throw=False).value

    return [
        _case(
            "sparse",
            f"sparse Poisson {side}^2 (BCSR), CG 200 steps",
            poisson_sparse,
            (sparse_operator, rhs),
            poisson_stencil,
            (rhs,),
            "ours within 1.2x of the stencil",
        ),
        _case(
            "sparse-traced",
            f"sparse Poisson {side}^2 (BCSR) built under jit, CG 200 steps",
            poisson_sparse_traced,
            (bcsr, rhs),
            poisson_stencil,
            (rhs,),
            "(no target: the general path)",
        ),
    ]


def build_cases(args, dtype):
    import jax.random as jr

    keys = iter(jr.split(jr.key(0), 16))

    def normal(shape):
        return jr.normal(next(keys), shape, dtype)

    return [
        kronecker_case(normal, args.kron, dtype),
        woodbury_case(normal, next(keys), dtype),
        block_case(normal, dtype),
        *sparse_cases(normal, args.size, dtype),
    ]


def measure(case, quick):
    """Compile and run both sides of `case`, interleaved; compare their answers."""
    import numpy as np
    from _timing import compare_compile, compare_run

    fns = {"ours": case["ours"], "theirs": case["theirs"]}
    call_args = {"ours": case["ours_args"], "theirs": case["theirs_args"]}
    compiled = compare_compile(fns, call_args, reps=0 if quick else 1)
    runs = compare_run(
        {name: r["compiled"] for name, r in compiled.items()},
        call_args,
        target_s=0.5 if quick else 2.0,
        min_samples=2 if quick else 3,
        max_samples=50,
    )
    ours = np.asarray(compiled["ours"]["compiled"](*call_args["ours"]))
    theirs = np.asarray(compiled["theirs"]["compiled"](*call_args["theirs"]))
    difference = float(
        np.max(np.abs(ours.reshape(-1) - theirs.reshape(-1)))
        / max(np.max(np.abs(theirs)), 1e-30)
    )
    row = dict(
        case=case["name"],
        target=case["target"],
        ours_run_s=runs["ours"]["run_s"],
        dense_run_s=runs["theirs"]["run_s"],
        speedup=runs["theirs"]["run_s"] / runs["ours"]["run_s"],
        ours_compile_s=compiled["ours"]["compile_s"],
        dense_compile_s=compiled["theirs"]["compile_s"],
        relative_difference=difference,
    )
    print(
        f"{row['case']}: ours {row['ours_run_s'] * 1e3:.3f} ms, dense/reference "
        f"{row['dense_run_s'] * 1e3:.3f} ms, speed-up {row['speedup']:.1f}x, "
        f"compile {row['ours_compile_s']:.2f} s vs {row['dense_compile_s']:.2f} s,"
        f" max rel. difference {difference:.1e}",
        flush=True,
    )
    return row


def write_results(rows, dtype, out, x64):
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    meta = dict(
        dtype=jnp.dtype(dtype).name,
        device=f"{device.platform} {device.device_kind}",
        machine=platform.machine(),
        openblas_threads=os.environ.get("OPENBLAS_NUM_THREADS", "unset"),
        jax=jax.__version__,
    )
    header = (
        "| case | target | lineax structured (ms) | dense / reference (ms) | "
        "speed-up | compile lineax (s) | compile reference (s) | max rel. diff |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['case']} | {r['target']} | {r['ours_run_s'] * 1e3:.3f} | "
        f"{r['dense_run_s'] * 1e3:.3f} | {r['speedup']:.1f}x | "
        f"{r['ours_compile_s']:.2f} | {r['dense_compile_s']:.2f} | "
        f"{r['relative_difference']:.1e} |"
        for r in rows
    ]
    table = (
        f"Structured solves ({meta['dtype']}, {meta['device']}, jax {meta['jax']}, "
        f"OPENBLAS_NUM_THREADS={meta['openblas_threads']})."
        "\n\n" + header + "\n".join(lines) + "\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-x64" if x64 else ""
    (out / f"table{suffix}.md").write_text(table)
    (out / f"results{suffix}.json").write_text(
        json.dumps(dict(meta=meta, rows=rows), indent=2)
    )
    print(table)


def main(argv=None):
    args = parse_args(argv)
    limit_blas_threads(args.blas_threads)
    selected = set(args.cases.split(","))
    sys.path.insert(0, str(HERE))
    import jax

    jax.config.update("jax_enable_x64", args.x64)
    import jax.numpy as jnp

    dtype = jnp.float64 if args.x64 else jnp.float32
    cases = build_cases(args, dtype)
    unknown = selected - {case["key"] for case in cases}
    if unknown:
        raise SystemExit(f"unknown --cases {sorted(unknown)}")
    rows = [measure(case, args.quick) for case in cases if case["key"] in selected]
    write_results(rows, dtype, args.out or HERE / "results" / "structured", args.x64)


if __name__ == "__main__":
    main()
