"""Compile time of lineax against JAX native and the published lineax 0.1.1.

    PYTHONPATH=src python benchmarks/compile_time.py [--x64] [--reps 3]
        [--cases RE] [--published PYTHON] [--out DIR]

For each case of issue 16 this measures, for this library, for the closest
JAX-native call and for the published lineax (run by the same script in a
subprocess under `--published`, default /work/oracle-venv/bin/python, with this
checkout's `src/` kept off its path):

- compile time: `jax.jit(f).trace(*args)`, `.lower()`, `.compile()` wall times
  (tracing, lowering, XLA compile; their sum is the wall time of
  `jax.jit(f).lower(*args).compile()`), and the CPU time of the whole
  (`time.process_time()`, every thread of the process), with a fresh function
  object every time; one warm-up, then the median of `--reps`, the three
  implementations interleaved (each repetition measures lib, JAX, published in
  turn). The budget is judged on CPU time: on a shared machine the wall time
  also counts the time the process waits for a core (2-3x under a load average
  of 10 on 2 cores), the CPU time does not;
- sizes: jaxpr equations (recursive: sub-jaxprs of `cond`/`while`/`pjit` are
  counted, and so is the jaxpr of a `linear_solve` primitive's implementation,
  which is otherwise opaque in the jaxpr), StableHLO operations of the lowered
  module, and instructions of the optimised HLO (`compiled.as_text()`);
- the un-jitted entry point's first call (`jax.clear_caches()` before each).

Writes `results.json` and `table.md` to `--out` (default
`benchmarks/results/compile[-x64]/`). See docs/benchmarks.md.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time


HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _problems as P  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.scipy as jsp  # noqa: E402
import jax.scipy.sparse.linalg as jssl  # noqa: E402
import numpy as np  # noqa: E402

import lineax as lx  # noqa: E402


DEFAULT_PUBLISHED = "/work/oracle-venv/bin/python"


# ---------------------------------------------------------------------------
# Sizes of what is compiled.


def count_jaxpr_eqns(jaxpr) -> int:
    """Equations of a (closed) jaxpr, recursively: the sub-jaxprs in equation
    parameters (`cond` branches, `while` bodies, `pjit`, custom rules), and the
    implementation of opaque `linear_solve` primitives, traced at their avals."""
    from jax.extend import core as jex_core

    def subjaxprs(p):
        if isinstance(p, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
            return [p]
        if isinstance(p, (tuple, list)):
            return [s for q in p for s in subjaxprs(q)]
        return []

    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        if _is_linear_solve(eqn.primitive):
            # Its parameters may hold jaxprs (a closure-converted matvec) that the
            # implementation inlines: count the implementation only.
            subs = [_impl_jaxpr(eqn)]
        else:
            subs = [s for p in eqn.params.values() for s in subjaxprs(p)]
        total += sum(count_jaxpr_eqns(s) for s in subs)
    return total


def _is_linear_solve(prim) -> bool:
    # `linear_solve`, and the batched version made by `eqxi.create_vprim`.
    return prim.name in ("linear_solve", "vprim") and hasattr(prim, "impl")


def _impl_jaxpr(eqn):
    avals = [v.aval for v in eqn.invars]
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
    return jax.make_jaxpr(lambda *xs: eqn.primitive.impl(*xs, **eqn.params))(*structs)


# `  %x = f32[3]{0} add(...)`, `  ROOT %t = (...) tuple(...)`: one instruction.
_HLO_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?[\w.\-]+\s*=\s*\S")
# `%0 = stablehlo.add ...`, `stablehlo.return ...`, `func.call ...`: one operation.
_STABLEHLO_OP = re.compile(r"^\s*(%[^=]*=\s*)?\"?(stablehlo|chlo|func|mhlo|sdy)\.")


def count_hlo_instructions(hlo_text: str) -> int:
    return sum(
        1
        for line in hlo_text.splitlines()
        if _HLO_INSTRUCTION.match(line) and not line.lstrip().startswith("HloModule")
    )


def count_stablehlo_ops(mlir_text: str) -> int:
    return sum(1 for line in mlir_text.splitlines() if _STABLEHLO_OP.match(line))


# ---------------------------------------------------------------------------
# The cases. Each builder takes the implementation ("lineax": whichever lineax
# this interpreter imports; "jax": JAX native) and the dtype, and returns
# `(make_fn, args)`: `make_fn()` returns a new function object each call.


def _put(x, dtype):
    return jnp.asarray(x, dtype=dtype)


def _jnp_lstsq(A, b):
    return jnp.linalg.lstsq(A, b)[0]


def _cho_solve(A, b):
    return jsp.linalg.cho_solve(jsp.linalg.cho_factor(A), b)


def _lineax_solve(solver, tags=()):
    def solve(A, b):
        return lx.linear_solve(lx.MatrixLinearOperator(A, tags), b, solver).value

    return solve


def _dense(solver_class, jax_solve):
    """A dense solve of an n x n matrix (symmetric positive definite for
    `lx.Cholesky`, which is then given the tag it needs)."""

    def build(impl, dtype, n=100):
        spd = solver_class is lx.Cholesky
        A = _put(P.spd_matrix(n, 0) if spd else P.dense_matrix(n, 0), dtype)
        b = _put(P.vector(n, 1), dtype)
        if impl == "jax":
            solve = jax_solve
        else:
            tags = (lx.positive_semidefinite_tag,) if spd else ()
            solve = _lineax_solve(solver_class(), tags)

        def make():
            return lambda A, b: solve(A, b)

        return make, (A, b)

    return build


def _grad(solver_class, jax_solve, shape, seed):
    """`jax.grad` of `sum(x ** 2)` for the solution `x`, with respect to the
    matrix (of `shape`) and the vector."""

    def build(impl, dtype):
        m, n = shape
        A = P.dense_matrix(n, seed) if m == n else P.tall_matrix(m, n, seed)
        A, b = _put(A, dtype), _put(P.vector(m, seed + 1), dtype)
        solve = jax_solve if impl == "jax" else _lineax_solve(solver_class())

        def make():
            return jax.grad(lambda A, b: jnp.sum(solve(A, b) ** 2), argnums=(0, 1))

        return make, (A, b)

    return build


def _vmap_lu(impl, dtype, batch=200, n=50):
    r = P.rng(6)
    A = _put(r.standard_normal((batch, n, n)) / np.sqrt(n) + 2.0 * np.eye(n), dtype)
    b = _put(r.standard_normal((batch, n)), dtype)
    solve = jnp.linalg.solve if impl == "jax" else _lineax_solve(lx.LU())

    def make():
        return jax.vmap(lambda A, b: solve(A, b))

    return make, (A, b)


def _krylov(solver_class, jax_solver):
    """A Krylov solve of the N x N stencil problem (the Poisson one, positive
    definite, for `lx.CG`; convection-diffusion otherwise), matrix-free."""

    def build(impl, dtype, N=64):
        rtol = 1e-10 if dtype == jnp.float64 else 1e-5
        definite = solver_class is lx.CG
        convection = 0.0 if definite else P.CONVECTION
        b = _put(P.vector(N * N, 11), dtype)
        if impl == "jax":

            def make():
                mv = P.stencil_mv(jnp, N, convection)
                return lambda b: jax_solver(mv, b, tol=rtol, atol=0.0)[0]

            return make, (b,)
        tags = (lx.positive_semidefinite_tag,) if definite else ()
        solver = solver_class(rtol=rtol, atol=0.0, norm=lx.internal.two_norm)
        struct = jax.ShapeDtypeStruct((N * N,), dtype)

        def make():
            mv = P.stencil_mv(jnp, N, convection)
            return lambda b: (
                lx.linear_solve(
                    lx.FunctionLinearOperator(mv, struct, tags), b, solver
                ).value
            )

        return make, (b,)

    return build


def _unjitted(impl, dtype, n=10):
    A, b = _put(P.dense_matrix(n, 12), dtype), _put(P.vector(n, 13), dtype)
    if impl == "jax":

        def make():
            return lambda: jnp.linalg.solve(A, b)
    else:

        def make():
            return lambda: lx.linear_solve(lx.MatrixLinearOperator(A), b).value

    return make, ()


# name -> (builder, JAX-native baseline, budget as a ratio to JAX)
CASES = {
    "grad_lu_n100": (
        _grad(lx.LU, jnp.linalg.solve, (100, 100), 2),
        "grad of jnp.linalg.solve",
        1.5,
    ),
    "grad_lstsq_qr_200x100": (
        _grad(lx.QR, _jnp_lstsq, (200, 100), 4),
        "grad of jnp.linalg.lstsq",
        1.5,
    ),
    "vmap_lu_200x50": (_vmap_lu, "vmap(jnp.linalg.solve)", 1.5),
    "cg_poisson_N64": (_krylov(lx.CG, jssl.cg), "jax.scipy.sparse.linalg.cg", 1.5),
    "gmres_convdiff_N64": (
        _krylov(lx.GMRES, jssl.gmres),
        "jax.scipy.sparse.linalg.gmres",
        1.5,
    ),
    "bicgstab_convdiff_N64": (
        _krylov(lx.BiCGStab, jssl.bicgstab),
        "jax.scipy.sparse.linalg.bicgstab",
        1.5,
    ),
    "dense_lu_n100": (_dense(lx.LU, jnp.linalg.solve), "jnp.linalg.solve", 1.2),
    "dense_cholesky_n100": (
        _dense(lx.Cholesky, _cho_solve),
        "jsp.linalg.cho_solve",
        1.2,
    ),
    "dense_svd_n100": (_dense(lx.SVD, _jnp_lstsq), "jnp.linalg.lstsq", 1.2),
    "unjitted_first_call_n10": (_unjitted, "first jnp.linalg.solve call", 1.2),
}


# ---------------------------------------------------------------------------
# Measuring one implementation of one case (in this process).


def measure(name: str, impl: str, dtype, counts: bool) -> dict:
    builder = CASES[name][0]
    make, args = builder(impl, dtype)
    if name.startswith("unjitted"):
        f = make()
        jax.clear_caches()
        c0 = time.process_time()
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        return {"total": time.perf_counter() - t0, "cpu": time.process_time() - c0}
    f = make()
    c0 = time.process_time()
    t0 = time.perf_counter()
    traced = jax.jit(f).trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    c3 = time.process_time()
    out = {
        "trace": t1 - t0,
        "lower": t2 - t1,
        "compile": t3 - t2,
        "total": t3 - t0,
        "cpu": c3 - c0,
    }
    if counts:
        out["jaxpr_eqns"] = count_jaxpr_eqns(traced.jaxpr)
        out["stablehlo_ops"] = count_stablehlo_ops(lowered.as_text())
        out["hlo_instructions"] = count_hlo_instructions(compiled.as_text())
    return out


def worker(dtype) -> None:
    """Serve `measure` requests (one JSON line each way) for the parent process."""
    print(json.dumps({"lineax": lx.__file__, "jax": jax.__version__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            res = measure(req["name"], "lineax", dtype, req["counts"])
        except Exception as e:  # noqa: BLE001 - reported in the table
            res = {"error": repr(e)[:300]}
        print(json.dumps(res), flush=True)


class Published:
    """The published lineax, measured by this script in another interpreter."""

    def __init__(self, python: str, x64: bool):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        cmd = [python, str(HERE / "compile_time.py"), "--worker"]
        if x64:
            cmd.append("--x64")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(HERE),
        )
        assert self.proc.stdout is not None
        self.info = json.loads(self.proc.stdout.readline())
        if str(HERE.parent / "src") in self.info["lineax"]:
            raise RuntimeError(f"published worker imported {self.info['lineax']}")

    def measure(self, name: str, counts: bool) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"name": name, "counts": counts}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ---------------------------------------------------------------------------
# Driver.


IMPLS = ("lib", "jax", "published")


def run(names, reps, dtype, published) -> dict:
    results = {n: {i: [] for i in IMPLS} for n in names}
    sizes = {n: {} for n in names}

    def one(name, impl, counts):
        if impl == "published":
            if published is None:
                return None
            return published.measure(name, counts)
        try:
            return measure(name, "lineax" if impl == "lib" else "jax", dtype, counts)
        except Exception as e:  # noqa: BLE001 - reported in the table
            return {"error": repr(e)[:300]}

    # Jitted cases first: the un-jitted case clears JAX's caches.
    ordered = [n for n in names if not n.startswith("unjitted")]
    ordered += [n for n in names if n.startswith("unjitted")]
    for name in ordered:
        # Repetition 0 is the warm-up (it also records the sizes).
        for rep in range(reps + 1):
            for impl in IMPLS:
                res = one(name, impl, counts=rep == 0)
                if res is None:
                    continue
                if rep == 0:
                    sizes[name][impl] = {
                        k: res[k]
                        for k in ("jaxpr_eqns", "stablehlo_ops", "hlo_instructions")
                        if k in res
                    }
                    if "error" in res:
                        sizes[name][impl]["error"] = res["error"]
                elif "error" not in res:
                    results[name][impl].append(res)
        print(f"  measured {name}", file=sys.stderr, flush=True)

    table = {}
    for name in names:
        row = {"baseline": CASES[name][1], "budget": CASES[name][2]}
        for impl in IMPLS:
            samples = results[name][impl]
            row[impl] = dict(sizes[name].get(impl, {}))
            for key in ("trace", "lower", "compile", "total", "cpu"):
                vals = [s[key] for s in samples if key in s]
                if vals:
                    row[impl][key] = statistics.median(vals)
            row[impl]["samples"] = [round(s["total"], 4) for s in samples]
        table[name] = row
    return table


def _ms(x):
    return "-" if x is None else f"{1e3 * x:.0f}"


def _ratio(a, b):
    return "-" if a is None or b is None else f"{a / b:.2f}"


def markdown(table) -> str:
    """Two tables: CPU time (the budget's measure, see the module docstring) with
    the sizes, then wall time with its trace/lower/XLA split."""
    cpu_lines = [
        "| case | CPU ms lib/JAX/pub | lib/JAX | published/JAX | lib/published "
        "| target: lib/JAX at most, and lib/published at most 1 "
        "| jaxpr eqns lib/JAX/pub | StableHLO ops lib/JAX/pub "
        "| HLO instr lib/JAX/pub |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    wall_lines = [
        "| case | lib ms (trace/lower/XLA) | JAX ms (trace/lower/XLA) "
        "| published ms (trace/lower/XLA) | lib/JAX | published/JAX "
        "| lib/published |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        lib, jx, pub = row["lib"], row["jax"], row["published"]

        def split(d):
            if "trace" not in d:
                return _ms(d.get("total"))
            return (
                f"{_ms(d['total'])} ({_ms(d['trace'])}/{_ms(d['lower'])}/"
                f"{_ms(d['compile'])})"
            )

        def three(key, impls=(lib, jx, pub)):
            return "/".join(str(d.get(key, "-")) for d in impls)

        lc, jc, pc = lib.get("cpu"), jx.get("cpu"), pub.get("cpu")
        ok = (
            lc is not None
            and jc is not None
            and lc <= row["budget"] * jc
            and (pc is None or lc <= pc)
        )
        cpu_lines.append(
            f"| {name} | {_ms(lc)}/{_ms(jc)}/{_ms(pc)} "
            f"| {_ratio(lc, jc)} | {_ratio(pc, jc)} | {_ratio(lc, pc)} "
            f"| {row['budget']} ({'met' if ok else 'not met'}) | {three('jaxpr_eqns')} "
            f"| {three('stablehlo_ops')} | {three('hlo_instructions')} |"
        )
        lt, jt, pt = lib.get("total"), jx.get("total"), pub.get("total")
        wall_lines.append(
            f"| {name} | {split(lib)} | {split(jx)} | {split(pub)} "
            f"| {_ratio(lt, jt)} | {_ratio(pt, jt)} | {_ratio(lt, pt)} |"
        )
    return "\n".join(cpu_lines) + "\n\n" + "\n".join(wall_lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--x64", action="store_true", help="float64 (default float32)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    p.add_argument("--cases", default=None, metavar="RE", help="case name filter")
    p.add_argument(
        "--published",
        default=DEFAULT_PUBLISHED,
        metavar="PYTHON",
        help="interpreter with the published lineax ('' to skip)",
    )
    p.add_argument("--out", default=None, metavar="DIR")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if args.x64 else jnp.float32
    if args.worker:
        return worker(dtype)

    names = [n for n in CASES if args.cases is None or re.search(args.cases, n)]
    print(f"lineax (lib): {lx.__file__}")
    published = None
    if args.published and os.path.exists(args.published):
        published = Published(args.published, args.x64)
        print(f"lineax (published): {published.info['lineax']}")
    try:
        table = run(names, args.reps, dtype, published)
    finally:
        if published is not None:
            published.close()
    md = markdown(table)
    print(md)
    out = pathlib.Path(
        args.out or HERE / "results" / ("compile-x64" if args.x64 else "compile")
    )
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load": os.getloadavg(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "dtype": jnp.dtype(dtype).name,
        "reps": args.reps,
        "lineax_lib": lx.__file__,
        "lineax_published": None if published is None else published.info["lineax"],
    }
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "cases": table}, indent=1)
    )
    (out / "table.md").write_text(md)
    print(f"wrote {out}/results.json and table.md")


if __name__ == "__main__":
    main()
