"""What the benchmark writes: the console and Markdown tables (for users: times,
ratios to JAX and a short note per case), `results.json` (every number and the
machine-readable target check) and the `ratios.png` chart."""

import json
import pathlib


# A true residual within 10% of `rtol` counts as reaching it (float32
# round-off in `b - A x` when it is recomputed).
ROUND_OFF = 1.1

# A median run-time ratio and the ratio of the fastest calls further apart than
# this are both shown.
BUSY = 1.25


def fmt_time(s):
    if s is None:
        return "-"
    if s >= 1.0:
        return f"{s:.2f}s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g}ms"
    return f"{s * 1e6:.3g}us"


def fmt_ratio(r):
    return "-" if r is None else f"{r:.2f}x"


def _sci(x):
    return "-" if x is None else f"{x:.1e}"


def _iterative_note(rec) -> list[str]:
    x, rtol = rec["extra"], rec["rtol"]
    if x["lib_successful"] and x["lib_residual"] <= ROUND_OFF * rtol:
        notes = [f"{x['lib_steps']} iterations to rtol {rtol:g}"]
    elif x["lib_successful"] and x["lib_residual"] <= ROUND_OFF * (
        rec.get("success_floor") or 0
    ):
        notes = [
            f"rtol {rtol:g} is below what the dtype can reach: lineax stops after "
            f"{x['lib_steps']} iterations, successful at the level it documents "
            f"for that (max(rtol, 10 eps cond) = {rec['success_floor']:.1e})"
        ]
    elif x["lib_successful"]:
        notes = [
            f"lineax reports rtol {rtol:g} reached after {x['lib_steps']} "
            "iterations, but the true residual is higher"
        ]
    else:
        outcome = x["lib_outcome"]
        notes = [
            f"rtol {rtol:g} not reached: lineax stops after {x['lib_steps']} "
            f"iterations and says so ({outcome[0].lower() + outcome[1:]})"
        ]
    notes.append(f"residual {_sci(x['lib_residual'])} (JAX {_sci(x['jax_residual'])})")
    if x.get("lib_matvecs") and x.get("jax_matvecs"):
        notes.append(
            f"{x['lib_matvecs']} matrix-vector products (JAX {x['jax_matvecs']})"
        )
        if x["jax_residual"] > ROUND_OFF * rtol:
            notes.append("JAX stops early (its updated residual drifts)")
    return notes


def notes(rec) -> str:
    """A short note for users: failures, answers that differ, iteration
    counts and residuals, and the case's own remark."""
    if rec.get("error"):
        return f"failed: {rec['error']}"
    if rec.get("lib_error"):
        return f"lineax failed: {rec['lib_error']}"
    x = rec.get("extra", {})
    parts = []
    if "lib_successful" in x:
        parts += _iterative_note(rec)
    elif rec.get("diff_tol") is not None and x.get("rel_diff", 0.0) > rec["diff_tol"]:
        parts.append(f"answers differ from JAX's by {_sci(x['rel_diff'])} (relative)")
    if rec.get("note"):
        parts.append(rec["note"])
    # On a busy machine the medians of short calls spread (thread wake-ups):
    # say so where the ratio of the fastest calls tells another story.
    median, fastest = rec.get("run_ratio"), rec.get("run_ratio_of_mins")
    if median and fastest and max(median / fastest, fastest / median) > BUSY:
        parts.append(f"fastest calls {fastest:.2f}x (busy machine: medians spread)")
    return "; ".join(parts)


# (Markdown header, console header, console width, cell)
COLUMNS = (
    ("case", "case", 28, lambda r: r["name"]),
    ("lineax compile", "lib comp", 9, lambda r: fmt_time(r.get("lib_compile_s"))),
    ("JAX compile", "jax comp", 9, lambda r: fmt_time(r.get("jax_compile_s"))),
    ("compile vs JAX", "c.ratio", 8, lambda r: fmt_ratio(r.get("compile_ratio"))),
    ("lineax run", "lib run", 9, lambda r: fmt_time(r.get("lib_run_s"))),
    ("JAX run", "jax run", 9, lambda r: fmt_time(r.get("jax_run_s"))),
    ("run vs JAX", "r.ratio", 8, lambda r: fmt_ratio(r.get("run_ratio"))),
    ("notes", "notes", 0, notes),
)


def _console_line(cells) -> str:
    widths = [w for _, _, w, _ in COLUMNS]
    return " ".join(
        c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths))
    )


def console_header() -> str:
    head = _console_line([short for _, short, _, _ in COLUMNS])
    return head + "\n" + "-" * len(head)


def console_row(rec) -> str:
    return _console_line([cell(rec) for _, _, _, cell in COLUMNS])


def markdown_table(records) -> str:
    lines = [
        "| " + " | ".join(head for head, _, _, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for rec in records:
        cells = [cell(rec) for _, _, _, cell in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _why(kind, target) -> str:
    if "ratio" in target:
        return f"{kind} {target['ratio']:.2f} > {target['target']:g}"
    if kind == "accuracy":
        return (
            f"residual {target['residual']:.1e}, rtol {target['rtol']:g}, "
            f"successful {target['successful']}"
        )
    return f"answers differ by {target['rel_diff']:.1e} > {target['max']:g}"


def target_summary(records) -> str:
    """For developers: which cases miss the targets of issue 6."""
    missed = [r for r in records if r["status"] not in ("ok", "ok (noise)")]
    lines = [f"issue 6 targets: {len(records) - len(missed)} of {len(records)} met"]
    for r in missed:
        t = r.get("targets", {})
        why = [_why(kind, v) for kind, v in t.items() if not v["met"]]
        lines.append(f"  {r['name']}: {r['status']} ({', '.join(why) or '-'})")
    return "\n".join(lines)


def save_chart(records, path, title) -> bool:
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


def write_outputs(out: pathlib.Path, info: dict, settings: dict, records) -> None:
    """`results.json`, `table.md` and (with matplotlib) `ratios.png` in `out`."""
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
