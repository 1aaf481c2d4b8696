"""Benchmarks: lineax against the closest JAX-native call, side by side.

    PYTHONPATH=src python benchmarks/run.py --scale cpu [--x64] [--cases RE]
                                            [--out DIR] [--quick] [--profile]

For each case this measures, for lineax and for JAX in the same process:

- compile time: `jax.jit(f).lower(*args).compile()` wall time, with a fresh
  function object every time so nothing is served from JAX's tracing cache
  (median of 3 after one warm-up compile; `--quick`: the single first one);
- run time: median over many calls of the `jax.jit`-ed function (after its
  first, compiling, call), blocking on the result, repetitions interleaved
  between the two libraries and adapted so that each side takes about a second.

It prints a table (times, ratios lineax / JAX, a note per case) and which
cases miss the targets of issue 6, and writes `results.json`, `table.md` and
`ratios.png` (if matplotlib is installed) to `--out` (default
`benchmarks/results/<scale>[-x64]/`). OpenBLAS runs on one thread unless
`OPENBLAS_NUM_THREADS` is set. See docs/benchmarks.md.
"""

import argparse
import datetime
import functools
import os
import pathlib
import platform
import re
import sys
import time
import traceback


# JAX's CPU LAPACK kernels (LU, QR, triangular solves) call SciPy's OpenBLAS.
# On a machine with more busy threads than cores, OpenBLAS's worker threads
# make a 500x500 solve take 100-900 ms instead of 2-3 ms, at random, on either
# side of a comparison; one BLAS thread removes that noise (a value set by the
# caller is kept, and recorded in results.json). It must be set before NumPy,
# SciPy or jaxlib load OpenBLAS, hence before the imports below.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import _cases  # noqa: E402
import _report  # noqa: E402
import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _report import ROUND_OFF  # noqa: E402
from _timing import (  # noqa: E402
    compare_compile,
    compare_python_calls,
    compare_run,
    jit_fresh,
)

import lineax as lx  # noqa: E402


HERE = pathlib.Path(__file__).resolve().parent

SETTINGS = {
    "full": dict(
        compile_reps=3,
        target_s=1.0,
        min_samples=7,
        max_samples=2000,
        unjit_warmup=200,
        unjit_calls=2000,
    ),
    "quick": dict(
        compile_reps=0,
        target_s=0.05,
        min_samples=3,
        max_samples=20,
        unjit_warmup=10,
        unjit_calls=100,
    ),
}

# Run-to-run noise of a ratio on a quiet machine: running the *same* JAX call
# on both sides gives ratios between 0.98 and 1.02 (docs/benchmarks.md). A
# ratio above its target by less than this is reported as "ok (noise)".
NOISE = 0.02


# ---------------------------------------------------------------------------
# step 1: the command line and the cases


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--scale",
        choices=("cpu", "gpu"),
        default="cpu",
        help="problem sizes (default: cpu)",
    )
    p.add_argument(
        "--x64",
        action="store_true",
        help="float64 (default float32); Krylov rtol 1e-10 not 1e-5",
    )
    p.add_argument(
        "--cases",
        default=None,
        metavar="PATTERN",
        help="only cases whose name matches this regular expression",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output folder (default benchmarks/results/<scale>[-x64])",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="minimal repetitions (smoke test); timings are rough",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also print a cProfile of the un-jitted lineax solve",
    )
    p.add_argument("--list", action="store_true", help="list case names and exit")
    return p.parse_args(argv)


def select_cases(args) -> list:
    """Sets the dtype, then returns the cases matching `--cases`."""
    # Before any array is made (neither lineax nor `_cases` makes one on import).
    jax.config.update("jax_enable_x64", args.x64)
    cases = _cases.all_cases(args.scale, args.x64)
    if args.cases:
        pattern = re.compile(args.cases)
        cases = [c for c in cases if pattern.search(c.name)]
    return cases


# ---------------------------------------------------------------------------
# step 2: measuring one case


def _short_error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}"
    msg = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    return msg[:300]


def _lib_failed(rec, stage: str, e: BaseException) -> None:
    rec["lib_error"] = stage + _short_error(e)
    rec["lib_traceback"] = traceback.format_exc(limit=-8)


def run_compiled_case(built, settings, rec):
    fns = {"jax": built.jax_fn}
    args = {"jax": built.jax_args}
    # Trace once on its own, so a failure in lineax cannot take the JAX
    # measurement down with it. (Both sides get this warm-up trace.)
    try:
        jax.eval_shape(built.lib_fn, *built.lib_args)
        fns["lib"], args["lib"] = built.lib_fn, built.lib_args
    except Exception as e:  # noqa: BLE001
        _lib_failed(rec, "", e)
    jax.eval_shape(built.jax_fn, *built.jax_args)

    try:
        comp = compare_compile(fns, args, settings["compile_reps"])
    except Exception as e:  # noqa: BLE001
        if "lib" not in fns:
            raise
        _lib_failed(rec, "compile: ", e)
        del fns["lib"], args["lib"]
        comp = compare_compile(fns, args, settings["compile_reps"])
    # Run times are measured through `jax.jit(f)` (what users call), not the
    # AOT `Compiled` object: the latter has no C++ fast path for computations
    # with host callbacks (lineax's `throw=True` check), which would add tens
    # of microseconds per call that users never pay.
    jitted = {k: jit_fresh(f) for k, f in fns.items()}

    outs = {}
    for side in list(jitted):
        try:
            outs[side] = jax.block_until_ready(jitted[side](*args[side]))
        except Exception as e:  # noqa: BLE001 - e.g. a runtime error from throw
            if side != "lib":
                raise
            _lib_failed(rec, "run: ", e)
            del jitted[side]
    runs = compare_run(
        jitted,
        args,
        settings["target_s"],
        settings["min_samples"],
        settings["max_samples"],
    )

    for side in jitted:
        c, r = comp[side], runs[side]
        rec[f"{side}_compile_s"] = c["compile_s"]
        rec[f"{side}_lower_s"] = c["lower_s"]
        rec[f"{side}_xla_compile_s"] = c["xla_compile_s"]
        rec[f"{side}_first_compile_s"] = c["first_s"]
        rec[f"{side}_run_s"] = r["run_s"]
        rec[f"{side}_run_min_s"] = r["run_min_s"]
        rec[f"{side}_samples"] = r["samples"]
        rec[f"{side}_inner"] = r["inner"]
    if "lib" in outs:
        rec["extra"] = built.check(outs["lib"], outs["jax"])


def unjitted_breakdown(built, settings):
    """Where the time of one un-jitted lineax call goes."""
    A, b = built.lib_args
    op = lx.MatrixLinearOperator(A)
    jitted = eqx.filter_jit(lambda op, b: lx.linear_solve(op, b).value)
    jitted_jnp = eqx.filter_jit(lambda A, b: jnp.linalg.solve(A, b))
    fns = {
        "MatrixLinearOperator(A)": lambda: lx.MatrixLinearOperator(A).matrix,
        "linear_solve(op, b) (op prebuilt)": lambda: lx.linear_solve(op, b).value,
        "eqx.filter_jit(linear_solve)(op, b)": lambda: jitted(op, b),
        "eqx.filter_jit(jnp.linalg.solve)(A, b)": lambda: jitted_jnp(A, b),
        "jnp.linalg.solve(A, b)": lambda: jnp.linalg.solve(A, b),
    }
    res = compare_python_calls(
        fns, settings["unjit_warmup"], max(settings["unjit_calls"] // 4, 10)
    )
    return {k: v["run_s"] for k, v in res.items()}


def profile_unjitted(case, lib_call) -> None:
    import cProfile
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(500):
        lib_call()
    pr.disable()
    print(f"\ncProfile of 500 un-jitted lineax calls ({case.name}):")
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)
    pstats.Stats(pr).sort_stats("cumulative").print_stats(25)


def run_unjitted_case(case, built, settings, rec, profile):
    calls = {"jax": functools.partial(built.jax_fn, *built.jax_args)}
    lib_call = functools.partial(built.lib_fn, *built.lib_args)
    try:
        lib_call()
        calls["lib"] = lib_call
    except Exception as e:  # noqa: BLE001
        _lib_failed(rec, "", e)
    runs = compare_python_calls(
        calls, settings["unjit_warmup"], settings["unjit_calls"]
    )
    for side, r in runs.items():
        rec[f"{side}_run_s"] = r["run_s"]
        rec[f"{side}_run_min_s"] = r["run_min_s"]
        rec[f"{side}_samples"] = r["samples"]
    if "lib" not in calls:
        return
    rec["extra"] = built.check(lib_call(), calls["jax"]())
    try:
        rec["breakdown_s"] = unjitted_breakdown(built, settings)
    except Exception as e:  # noqa: BLE001
        rec["breakdown_error"] = _short_error(e)
    if profile:
        profile_unjitted(case, lib_call)


# ---------------------------------------------------------------------------
# step 3: judging one case against its targets


def _ratio_target(ratio, target):
    return dict(
        target=target,
        ratio=ratio,
        met=ratio <= target * (1 + NOISE),
        within_noise=target < ratio <= target * (1 + NOISE),
    )


def _accuracy_target(case, x):
    """Iterative solvers. A case that must converge: `successful`, with a true
    residual at most `rtol` (up to round-off). A case below the dtype's floor:
    no false `successful`, and a residual within 10x of JAX's answer."""
    reached = x["lib_residual"] <= ROUND_OFF * case.rtol
    if case.must_converge:
        met = x["lib_successful"] and reached
    else:
        # (Successful at LSMR's documented level, see `Case.success_floor`.)
        at_floor = case.success_floor is not None and (
            x["lib_residual"] <= ROUND_OFF * case.success_floor
        )
        honest = reached or at_floor or not x["lib_successful"]
        close = x["lib_residual"] <= max(ROUND_OFF * case.rtol, 10 * x["jax_residual"])
        met = honest and close
    return dict(
        rtol=case.rtol,
        must_converge=case.must_converge,
        residual=x["lib_residual"],
        successful=x["lib_successful"],
        met=met,
    )


def evaluate(rec, case):
    """Ratios, and the check of the targets (`targets`, `status`)."""
    for kind in ("compile", "run"):
        lib, jx = rec.get(f"lib_{kind}_s"), rec.get(f"jax_{kind}_s")
        rec[f"{kind}_ratio"] = lib / jx if lib is not None and jx else None
    # Ratio of the fastest samples: less sensitive to a busy machine.
    lib, jx = rec.get("lib_run_min_s"), rec.get("jax_run_min_s")
    rec["run_ratio_of_mins"] = lib / jx if lib is not None and jx else None
    if rec.get("error"):
        rec["status"] = "error"
        return
    if rec.get("lib_error"):
        rec["status"] = "lib error"
        return
    targets = {}
    for kind, target in (("run", case.run_target), ("compile", case.compile_target)):
        if target is not None and rec[f"{kind}_ratio"] is not None:
            targets[kind] = _ratio_target(rec[f"{kind}_ratio"], target)
    x = rec.get("extra", {})
    if case.rtol is not None:
        targets["accuracy"] = _accuracy_target(case, x)
    elif case.diff_tol is not None:
        rel_diff = x["rel_diff"]
        targets["answer"] = dict(
            rel_diff=rel_diff, max=case.diff_tol, met=rel_diff <= case.diff_tol
        )
    rec["targets"] = targets
    missed = [kind for kind, t in targets.items() if not t["met"]]
    if missed:
        rec["status"] = "miss: " + "+".join(missed)
    elif any(t.get("within_noise") for t in targets.values()):
        rec["status"] = "ok (noise)"
    else:
        rec["status"] = "ok"


def measure(case, settings, profile) -> dict:
    """Builds, measures and judges one case; never raises."""
    rec = dict(
        name=case.name,
        group=case.group,
        baseline=case.baseline,
        note=case.note,
        run_target=case.run_target,
        compile_target=case.compile_target,
        rtol=case.rtol,
        must_converge=case.must_converge if case.rtol is not None else None,
        success_floor=case.success_floor,
        diff_tol=case.diff_tol,
    )
    t0 = time.perf_counter()
    try:
        built = case.build()
        if case.unjitted:
            run_unjitted_case(case, built, settings, rec, profile)
        else:
            run_compiled_case(built, settings, rec)
    except Exception as e:  # noqa: BLE001 - report and go on
        rec["error"] = _short_error(e)
        rec["traceback"] = traceback.format_exc(limit=-8)
    rec["case_wall_s"] = time.perf_counter() - t0
    evaluate(rec, case)
    return rec


# ---------------------------------------------------------------------------
# step 4: the machine, the run, the outputs


def machine_info(args):
    dev = jax.devices()[0]
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(),
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        # The 1, 5 and 15 minute load averages when the run starts (and, as
        # `load_average_end`, when it ends): other processes on the machine.
        "load_average": os.getloadavg(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": getattr(__import__("jaxlib"), "__version__", None),
        "lineax_file": lx.__file__,
        "lineax_version": getattr(lx, "__version__", None),
        "dtype": "float64" if args.x64 else "float32",
        "scale": args.scale,
        "quick": args.quick,
        "cases_pattern": args.cases,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "openblas_num_threads": os.environ["OPENBLAS_NUM_THREADS"],
    }


def print_preamble(info, args):
    print("lineax: " + info["lineax_file"])
    print(
        f"jax {info['jax']} on {info['platform']} ({info['device_kind']}); "
        f"cpu: {info['cpu']} x{info['cpu_count']}; dtype {info['dtype']}; "
        f"scale {args.scale}{' (quick)' if args.quick else ''}; "
        f"OPENBLAS_NUM_THREADS={info['openblas_num_threads']}; "
        f"load average {' '.join(f'{x:.2f}' for x in info['load_average'])}"
    )
    if "src" not in pathlib.Path(info["lineax_file"]).parts:
        print(
            "WARNING: lineax is not imported from a src/ checkout; "
            "did you set PYTHONPATH=src?"
        )
    print()
    print(_report.console_header(), flush=True)


def print_summary(records, info):
    print(f"\ntotal wall time {info['total_wall_s']:.1f}s")
    print(
        "load average at the end: "
        + " ".join(f"{x:.2f}" for x in info["load_average_end"])
    )
    bd = next((r["breakdown_s"] for r in records if "breakdown_s" in r), None)
    if bd:
        print("\nun-jitted call breakdown (median per call):")
        for k, v in bd.items():
            print(f"  {k:42s} {_report.fmt_time(v)}")
    print("\n" + _report.target_summary(records))


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    cases = select_cases(args)
    if args.list:
        for c in cases:
            print(f"{c.name:28s} {c.group:9s} vs {c.baseline}")
        return 0
    if not cases:
        print(f"no case matches {args.cases!r} (see --list)")
        return 1
    settings = SETTINGS["quick" if args.quick else "full"]
    info = machine_info(args)
    print_preamble(info, args)

    records = []
    for case in cases:
        rec = measure(case, settings, args.profile)
        records.append(rec)
        print(_report.console_row(rec), flush=True)

    info["total_wall_s"] = time.perf_counter() - t_start
    info["load_average_end"] = os.getloadavg()
    print_summary(records, info)
    out = (
        pathlib.Path(args.out)
        if args.out
        else HERE / "results" / (args.scale + ("-x64" if args.x64 else ""))
    )
    _report.write_outputs(out, info, settings, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
