"""The kernels XLA:CPU compiles for a case of `compile_time.py`, each mapped to the
lineax source lines of its fused computation.

    PYTHONPATH=src python benchmarks/kernel_map.py [--cases RE] [--impl lineax]
        [--x64]

On XLA:CPU compile time follows the number of *different* kernels (LLVM
modules, 2-20 ms of CPU time each; fusions that read alike are compiled once),
so that number, and where each kernel comes from, is what a compile-time round
needs first (docs/compile-history.md). For each case this compiles the program
once in a subprocess, with XLA's log of the LLVM modules it compiles
(`TF_CPP_VMODULE=ir_compiler=1`) and the optimised HLO dumped with its stack
frames (`--xla_dump_to`), and prints, per kernel: the computation that holds it
(the entry, a `while` body or condition, a branch), its fusion, its shape, its
compile time in XLA's log, and the lineax lines most of its operations come
from (innermost frame under `src/lineax/` first). `--impl jax` maps JAX's
native call (no lineax lines, but the same kernel list); run it under
`/work/oracle-venv/bin/python` (without `PYTHONPATH=src`) for the published
package.
"""

import argparse
import collections
import os
import pathlib
import re
import subprocess
import sys
import tempfile


HERE = pathlib.Path(__file__).resolve().parent

# What the subprocess runs: compile one case (XLA's log and dump go to stderr and
# the dump folder).
_WORKER = """
import sys
sys.path.insert(0, {here!r})
import jax
if {x64}:
    jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import compile_time as C
make, args = C.CASES[{case!r}][0]({impl!r}, jnp.float64 if {x64} else jnp.float32)
jax.jit(make()).lower(*args).compile()
"""

_KERNEL_LOG = re.compile(
    r"Compiled LLVM module: __compute_module_(?:__compute_module_)?"
    r"([\w.\-]+?)(?:_kernel_module)? time: ([\d.]+) (ms|us|s)\b"
)


# Small helpers that most operations pass through: a line of theirs says nothing
# about where a kernel comes from, so the frame that called them is shown.
_HELPERS = {
    "_cast", "tree_axpy", "tree_scale", "tree_where", "tree_sub", "tree_zeros",
    "tree_dot", "safe_div", "norm2", "select", "nan_where", "__getattr__",
    "pack", "unpack", "_exponent_field", "_scale_of_field", "<lambda>",
}  # fmt: skip


def _section(text: str, name: str) -> str:
    match = re.search(rf"^{name}\n(.*?)(?=^[A-Za-z]|\Z)", text, re.S | re.M)
    return "" if match is None else match.group(1)


def _frames(text: str):
    """A function from a `stack_frame_id` to its lineax lines, innermost first."""
    files = {
        int(i): name
        for i, name in re.findall(r'^(\d+) "(.*)"$', _section(text, "FileNames"), re.M)
    }
    functions = {
        int(i): name
        for i, name in re.findall(
            r'^(\d+) "(.*)"$', _section(text, "FunctionNames"), re.M
        )
    }
    locations = {
        int(i): (int(f), functions.get(int(fn), ""), int(line))
        for i, f, fn, line in re.findall(
            r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)",
            _section(text, "FileLocations"),
            re.M,
        )
    }
    parents = {
        int(i): (int(loc), int(parent))
        for i, loc, parent in re.findall(
            r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)",
            _section(text, "StackFrames"),
            re.M,
        )
    }

    def lines(frame: int) -> list[str]:
        out, helpers, seen = [], [], set()
        while frame in parents and frame not in seen:
            seen.add(frame)
            loc, frame_parent = parents[frame]
            file_id, function, line = locations[loc]
            name = files[file_id]
            if "/src/lineax/" in name:
                where = f"{name.split('/src/lineax/')[1]}:{line}"
                is_helper = function.split(".")[-1] in _HELPERS
                (helpers if is_helper else out).append(where)
            frame = frame_parent
        # (Where the trace kept only helpers' frames, the innermost of them.)
        return out or helpers

    return lines


def _computations(text: str) -> dict[str, list[str]]:
    comps, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if match and not line.startswith(" "):
            current = match.group(1)
            comps[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps


def kernel_map(case: str, impl: str, x64: bool) -> list[tuple]:
    with tempfile.TemporaryDirectory() as dump:
        env = dict(os.environ)
        env["TF_CPP_MIN_LOG_LEVEL"] = "0"
        env["TF_CPP_VMODULE"] = "ir_compiler=1"
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_as_text"
        )
        code = _WORKER.format(here=str(HERE), x64=x64, case=case, impl=impl)
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True
        )
        if run.returncode != 0:
            raise RuntimeError(run.stderr[-3000:])
        unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}
        compiled = {
            name: float(t) * unit[u] for name, t, u in _KERNEL_LOG.findall(run.stderr)
        }
        dumps = sorted(pathlib.Path(dump).glob("*jit__lambda*after_optimizations.txt"))
        text = dumps[-1].read_text()
    lines_of = _frames(text)
    comps = _computations(text)
    rows = []
    for holder, body in comps.items():
        for line in body:
            match = re.match(
                r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) fusion\(.*calls=%?([\w.\-]+)", line
            )
            if match is None or match.group(1) not in compiled:
                continue
            name, shape, called = match.groups()
            count = collections.Counter()
            for op in comps.get(called, []):
                frame = re.search(r"stack_frame_id=(\d+)", op)
                found = [] if frame is None else lines_of(int(frame.group(1)))
                if found:
                    count[found[0]] += 1
            where = ", ".join(k for k, _ in count.most_common(4))
            rows.append((holder, name, shape, compiled[name], where))
    return rows


def main() -> None:
    sys.path.insert(0, str(HERE))
    import compile_time

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--cases", default="cg_poisson|bicgstab", help="case filter")
    parser.add_argument("--impl", default="lineax", choices=["lineax", "jax"])
    parser.add_argument("--x64", action="store_true", help="float64")
    args = parser.parse_args()
    for case in compile_time.CASES:
        if not re.search(args.cases, case) or case.startswith("unjitted"):
            continue
        rows = kernel_map(case, args.impl, args.x64)
        total = sum(r[3] for r in rows)
        print(
            f"\n{case} ({args.impl}): {len(rows)} kernels, {total:.0f} ms in XLA's log"
        )
        for holder, name, shape, ms, where in rows:
            print(f"  {holder[:30]:30s} {name:34s} {shape[:16]:16s} {ms:5.1f} {where}")


if __name__ == "__main__":
    main()
