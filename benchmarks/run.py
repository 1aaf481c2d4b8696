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

It prints a table, and writes `results.json` and `ratios.png` (if matplotlib
is installed) to `--out` (default `benchmarks/results/<scale>[-x64]/`).
See docs/benchmarks.md.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import sys
import time
import traceback


HERE = pathlib.Path(__file__).resolve().parent


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


# ---------------------------------------------------------------------------
# formatting


def fmt_time(s):
    if s is None:
        return "-"
    if s >= 1.0:
        return f"{s:.2f}s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g}ms"
    return f"{s * 1e6:.3g}us"


def fmt_ratio(r):
    return "-" if r is None else f"{r:.2f}"


def fmt_sci(x):
    return "-" if x is None else f"{x:.1e}"


COLUMNS = [
    ("case", 24),
    ("lib comp", 9),
    ("jax comp", 9),
    ("c.ratio", 7),
    ("lib run", 9),
    ("jax run", 9),
    ("r.ratio", 7),
    ("target", 11),
    ("status", 14),
    ("lib it", 6),
    ("lib mv", 6),
    ("jax mv", 6),
    ("lib res", 8),
    ("jax res", 8),
    ("rel diff", 8),
]


def _target_str(rec):
    parts = []
    if rec["run_target"] is not None:
        parts.append(f"r<={rec['run_target']:g}")
    if rec["compile_target"] is not None:
        parts.append(f"c<={rec['compile_target']:g}")
    return ",".join(parts) or "-"


def table_row(rec):
    x = rec.get("extra", {})
    cells = [
        rec["name"],
        fmt_time(rec.get("lib_compile_s")),
        fmt_time(rec.get("jax_compile_s")),
        fmt_ratio(rec.get("compile_ratio")),
        fmt_time(rec.get("lib_run_s")),
        fmt_time(rec.get("jax_run_s")),
        fmt_ratio(rec.get("run_ratio")),
        _target_str(rec),
        rec["status"],
        str(x.get("lib_steps", "-")),
        str(x.get("lib_matvecs", "-") or "-"),
        str(x.get("jax_matvecs", "-") or "-"),
        fmt_sci(x.get("lib_residual")),
        fmt_sci(x.get("jax_residual")),
        fmt_sci(x.get("rel_diff")),
    ]
    return " ".join(
        c.ljust(w) if i == 0 else c.rjust(w)
        for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS))
    )


def table_header():
    head = " ".join(
        h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(COLUMNS)
    )
    return head + "\n" + "-" * len(head)


def markdown_table(records):
    lines = [
        "| case | lib compile | jax compile | compile ratio | lib run | "
        "jax run | run ratio | target | status | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in records:
        x = rec.get("extra", {})
        notes = []
        if "lib_steps" in x:
            notes.append(
                f"{x['lib_steps']} it, res {fmt_sci(x.get('lib_residual'))}"
                f" vs {fmt_sci(x.get('jax_residual'))}"
            )
            if x.get("lib_matvecs") and x.get("jax_matvecs"):
                notes.append(f"matvecs {x['lib_matvecs']} vs {x['jax_matvecs']}")
        elif rec.get("note"):
            notes.append(rec["note"])
        lines.append(
            f"| {rec['name']} | {fmt_time(rec.get('lib_compile_s'))} | "
            f"{fmt_time(rec.get('jax_compile_s'))} | "
            f"{fmt_ratio(rec.get('compile_ratio'))} | "
            f"{fmt_time(rec.get('lib_run_s'))} | {fmt_time(rec.get('jax_run_s'))} | "
            f"{fmt_ratio(rec.get('run_ratio'))} | {_target_str(rec)} | "
            f"{rec['status']} | {'; '.join(notes)} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# running one case


def _short_error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}"
    msg = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    return msg[:300]


def run_compiled_case(case, built, settings, rec):
    import jax
    from _timing import compare_compile, compare_run, jit_fresh

    fns = {"jax": built.jax_fn}
    args = {"jax": built.jax_args}
    if built.lib_fn is not None:
        # Trace once on its own, so a failure in lineax cannot take the JAX
        # measurement down with it. (Both sides get this warm-up trace.)
        try:
            jax.eval_shape(built.lib_fn, *built.lib_args)
            fns["lib"], args["lib"] = built.lib_fn, built.lib_args
        except Exception as e:  # noqa: BLE001
            rec["lib_error"] = _short_error(e)
            rec["lib_traceback"] = traceback.format_exc(limit=-8)
    jax.eval_shape(built.jax_fn, *built.jax_args)

    try:
        comp = compare_compile(fns, args, settings["compile_reps"])
    except Exception as e:  # noqa: BLE001
        if "lib" not in fns:
            raise
        rec["lib_error"] = "compile: " + _short_error(e)
        rec["lib_traceback"] = traceback.format_exc(limit=-8)
        del fns["lib"], args["lib"]
        comp = compare_compile(fns, args, settings["compile_reps"])
    for v in comp.values():
        del v["compiled"]
    # Run times are measured through `jax.jit(f)` (what users call), not the
    # AOT `Compiled` object: the latter has no C++ fast path for computations
    # with host callbacks (lineax's `throw=True` check), which would add tens
    # of microseconds per call that users never pay.
    compiled = {k: jit_fresh(f) for k, f in fns.items()}

    outs = {}
    for name in list(compiled):
        try:
            outs[name] = jax.block_until_ready(compiled[name](*args[name]))
        except Exception as e:  # noqa: BLE001 - e.g. a runtime error from throw
            if name != "lib":
                raise
            rec["lib_error"] = "run: " + _short_error(e)
            rec["lib_traceback"] = traceback.format_exc(limit=-8)
            del compiled[name]
    runs = compare_run(
        compiled,
        args,
        settings["target_s"],
        settings["min_samples"],
        settings["max_samples"],
    )

    for side in ("lib", "jax"):
        if side in compiled:
            rec[f"{side}_compile_s"] = comp[side]["compile_s"]
            rec[f"{side}_lower_s"] = comp[side]["lower_s"]
            rec[f"{side}_xla_compile_s"] = comp[side]["xla_compile_s"]
            rec[f"{side}_first_compile_s"] = comp[side]["first_s"]
            rec[f"{side}_run_s"] = runs[side]["run_s"]
            rec[f"{side}_run_min_s"] = runs[side]["run_min_s"]
            rec[f"{side}_samples"] = runs[side]["samples"]
            rec[f"{side}_inner"] = runs[side]["inner"]
    if built.check is not None:
        rec["extra"] = built.check(outs.get("lib"), outs["jax"])


def unjitted_breakdown(built, settings):
    """Where the time of one un-jitted lineax call goes."""
    import _cases
    import equinox as eqx
    import jax.numpy as jnp
    from _timing import compare_python_calls

    lx = _cases.lx
    A, b = built.raw_args
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


def run_unjitted_case(case, built, settings, rec, profile):
    from _timing import compare_python_calls

    fns = {"jax": built.jax_fn}
    if built.lib_fn is not None:
        try:
            built.lib_fn()
            fns["lib"] = built.lib_fn
        except Exception as e:  # noqa: BLE001
            rec["lib_error"] = _short_error(e)
            rec["lib_traceback"] = traceback.format_exc(limit=-8)
    runs = compare_python_calls(fns, settings["unjit_warmup"], settings["unjit_calls"])
    for side, r in runs.items():
        rec[f"{side}_run_s"] = r["run_s"]
        rec[f"{side}_run_min_s"] = r["run_min_s"]
        rec[f"{side}_samples"] = r["samples"]
    lib_out = fns["lib"]() if "lib" in fns else None
    rec["extra"] = built.check(lib_out, fns["jax"]()) if lib_out is not None else {}
    if "lib" in fns:
        try:
            rec["breakdown_s"] = unjitted_breakdown(built, settings)
        except Exception as e:  # noqa: BLE001
            rec["breakdown_error"] = _short_error(e)
        if profile:
            import cProfile
            import pstats

            pr = cProfile.Profile()
            pr.enable()
            for _ in range(500):
                built.lib_fn()
            pr.disable()
            print(f"\ncProfile of 500 un-jitted lineax calls ({case.name}):")
            pstats.Stats(pr).sort_stats("tottime").print_stats(25)
            pstats.Stats(pr).sort_stats("cumulative").print_stats(25)


# Run-to-run noise of a ratio on a quiet machine: running the *same* JAX call
# on both sides gives ratios between 0.98 and 1.02 (docs/benchmarks.md). A
# ratio above its target by less than this is reported as "ok (noise)".
NOISE = 0.02


def evaluate(rec, case):
    """Ratios and pass/fail against the issue's targets."""
    for kind in ("compile", "run"):
        lib, jx = rec.get(f"lib_{kind}_s"), rec.get(f"jax_{kind}_s")
        rec[f"{kind}_ratio"] = lib / jx if lib is not None and jx else None
    # Ratio of the fastest samples: less sensitive to a busy machine.
    lib, jx = rec.get("lib_run_min_s"), rec.get("jax_run_min_s")
    rec["run_ratio_of_mins"] = lib / jx if lib is not None and jx else None
    if rec.get("error"):
        rec["status"] = "error"
        return
    if rec.get("lib_missing"):
        rec["status"] = "missing"
        return
    if rec.get("lib_error"):
        rec["status"] = "lib error"
        return
    misses, within_noise = [], False
    for kind, target in (("run", case.run_target), ("compile", case.compile_target)):
        ratio = rec[f"{kind}_ratio"]
        if target is None or ratio is None or ratio <= target:
            continue
        if ratio <= target * (1 + NOISE):
            within_noise = True
        else:
            misses.append(kind[:4])
    x = rec.get("extra", {})
    if "lib_successful" in x:
        rtol = rec["rtol"]
        converged = x["lib_successful"] and x["lib_residual"] <= 1.1 * rtol
        if not converged:
            misses.append("unconverged")
    # (Krylov answers are judged by their true residuals instead.)
    if (
        "lib_successful" not in x
        and x.get("rel_diff") is not None
        and x["rel_diff"] > rec["diff_tol"]
    ):
        misses.append("WRONG")
    if misses:
        rec["status"] = "MISS " + "+".join(misses)
    else:
        rec["status"] = "ok (noise)" if within_noise else "ok"


# ---------------------------------------------------------------------------
# outputs


def machine_info(args):
    import _cases
    import jax

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
    lx = _cases.lx
    return {
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(),
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": getattr(__import__("jaxlib"), "__version__", None),
        "lineax_file": getattr(lx, "__file__", None),
        "lineax_version": getattr(lx, "__version__", None),
        "lineax_import_error": _cases.LINEAX_IMPORT_ERROR,
        "dtype": "float64" if args.x64 else "float32",
        "scale": args.scale,
        "quick": args.quick,
        "cases_pattern": args.cases,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def save_chart(records, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "matplotlib is not installed: skipping the chart (pip install matplotlib)"
        )
        return False
    recs = [
        r
        for r in records
        if r.get("run_ratio") is not None and r.get("lib_run_s") is not None
    ]
    if not recs:
        print("no ratios to plot: skipping the chart")
        return False
    import numpy as np

    names = [r["name"] for r in recs]
    y = np.arange(len(recs))
    h = 0.38
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(recs) + 1.6))
    run = [r["run_ratio"] for r in recs]
    comp = [r["compile_ratio"] if r.get("compile_ratio") else np.nan for r in recs]
    ax.barh(y - h / 2, run, h, label="run time ratio", color="tab:blue")
    ax.barh(y + h / 2, comp, h, label="compile time ratio", color="tab:orange")
    for i, r in enumerate(recs):
        if r["run_target"] is not None:
            ax.plot([r["run_target"]] * 2, [i - h, i], color="k", lw=2)
        if r["compile_target"] is not None:
            ax.plot([r["compile_target"]] * 2, [i, i + h], color="k", lw=2)
    ax.axvline(1.0, color="grey", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("lineax / JAX native (lower is better; black ticks: targets)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()

    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, str(HERE))
    import _cases  # noqa: E402 - after the dtype configuration

    cases = _cases.all_cases(args.scale, args.x64)
    if args.cases:
        pat = re.compile(args.cases)
        cases = [c for c in cases if pat.search(c.name)]
    if args.list:
        for c in cases:
            print(f"{c.name:28s} {c.group:9s} vs {c.baseline}")
        return 0
    if not cases:
        print(f"no case matches {args.cases!r} (see --list)")
        return 1

    if args.quick:
        settings = dict(
            compile_reps=0,
            target_s=0.05,
            min_samples=3,
            max_samples=20,
            unjit_warmup=10,
            unjit_calls=100,
        )
    else:
        settings = dict(
            compile_reps=3,
            target_s=1.0,
            min_samples=7,
            max_samples=2000,
            unjit_warmup=200,
            unjit_calls=2000,
        )

    info = machine_info(args)
    print(
        "lineax: "
        + (info["lineax_file"] or "NOT IMPORTABLE: " + str(info["lineax_import_error"]))
    )
    print(
        f"jax {info['jax']} on {info['platform']} ({info['device_kind']}); "
        f"cpu: {info['cpu']} x{info['cpu_count']}; dtype {info['dtype']}; "
        f"scale {args.scale}{' (quick)' if args.quick else ''}"
    )
    if info["lineax_file"] and "src" not in pathlib.Path(info["lineax_file"]).parts:
        print(
            "WARNING: lineax is not imported from a src/ checkout; "
            "did you set PYTHONPATH=src?"
        )
    print()
    print(table_header(), flush=True)

    eps_rel = 1e-9 if args.x64 else 1e-3
    records = []
    for case in cases:
        rec = dict(
            name=case.name,
            group=case.group,
            baseline=case.baseline,
            note=case.note,
            run_target=case.run_target,
            compile_target=case.compile_target,
            rtol=1e-10 if args.x64 else 1e-5,
            diff_tol=eps_rel,
        )
        t0 = time.perf_counter()
        built = None
        try:
            built = case.build()
            rec["lib_missing"] = built.lib_missing
            if built.unjitted:
                run_unjitted_case(case, built, settings, rec, args.profile)
            else:
                run_compiled_case(case, built, settings, rec)
        except Exception as e:  # noqa: BLE001 - report and go on
            rec["error"] = _short_error(e)
            rec["traceback"] = traceback.format_exc(limit=-8)
        rec["case_wall_s"] = time.perf_counter() - t0
        evaluate(rec, case)
        records.append(rec)
        print(table_row(rec), flush=True)
        for key in ("error", "lib_error", "lib_missing"):
            if rec.get(key):
                print(f"    {key}: {rec[key]}")
        del built  # free device memory before the next case

    wall = time.perf_counter() - t_start
    info["total_wall_s"] = wall
    print(f"\ntotal wall time {wall:.1f}s")
    bd = next((r["breakdown_s"] for r in records if "breakdown_s" in r), None)
    if bd:
        print("\nun-jitted call breakdown (median per call):")
        for k, v in bd.items():
            print(f"  {k:42s} {fmt_time(v)}")

    out = (
        pathlib.Path(args.out)
        if args.out
        else (HERE / "results" / (args.scale + ("-x64" if args.x64 else "")))
    )
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.json", "w") as f:
        json.dump(
            {"machine": info, "settings": settings, "cases": records},
            f,
            indent=1,
            default=str,
        )
    with open(out / "table.md", "w") as f:
        f.write(markdown_table(records) + "\n")
    title = (
        f"lineax / JAX — {info['device_kind']} ({info['platform']}), "
        f"{info['dtype']}, jax {info['jax']}"
    )
    charted = save_chart(records, out / "ratios.png", title)
    print(
        f"wrote {out / 'results.json'}, {out / 'table.md'}"
        + (f", {out / 'ratios.png'}" if charted else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
