"""Choose the slow tier (`tests/slow_tests.txt`) from a whole run's durations.

    python -m pytest -q --full -p no:cacheprovider --durations=0 > durations.log
    python tests/select_slow_tests.py durations.log --budget 0.4 > tests/slow_tests.txt

Each test function's time is the sum over its cases of pytest's setup, call and
teardown times (a module's fixtures, e.g. a subprocess, count for the first test
that uses them). The most expensive functions go to the slow tier, one by one,
until the rest takes at most `--budget` of the whole; the files of the core tests
(`CORE`: solves against NumPy, derivatives, batching and transposition, the
errors, the compile-size guard) stay whole in the default run, however long, and
so do the functions of `KEEP` (each kind of solver and operator against NumPy). A
function whose cases compile what its file's other functions reuse costs them
that compile when it leaves, so the default run is measured again after a change
of the list, not predicted.

Not a test module (pytest collects `test_*.py`); run it by hand, as above.
"""

import argparse
import collections
import re


# Files of the core tests: every test of these runs by default.
CORE = {
    "test_solve.py",
    "test_jvp.py",
    "test_vmap_transpose.py",
    "test_errors.py",
    "test_compile_guard.py",
    "test_throw.py",
}

# Functions kept in the default run wherever they are: every Krylov solver, every
# operator and every structured solver against dense NumPy, and the random
# property test of the solve.
KEEP = {
    "test_krylov.py::test_small_square",
    "test_operators.py::test_operator_matches_matrix",
    "test_structured.py::test_solve_matches_dense",
    "test_properties.py::test_solve_property",
}

_LINE = re.compile(r"^\s*([\d.]+)s (?:setup|call|teardown)\s+tests/(\S+)$")


def function_times(lines) -> dict[str, float]:
    """`file.py::function` -> seconds, from `--durations=0` output lines."""
    times: dict[str, float] = collections.defaultdict(float)
    for line in lines:
        match = _LINE.match(line)
        if match:
            seconds, node = match.groups()
            function = node.split("[")[0]
            times[function] += float(seconds)
    return times


def select(times: dict[str, float], budget: float) -> list[str]:
    """The functions of the slow tier: the longest first, until the rest takes at
    most `budget` (a fraction) of the whole."""
    total = sum(times.values())
    rest = total
    chosen = []
    for function, seconds in sorted(times.items(), key=lambda item: -item[1]):
        if rest <= budget * total:
            break
        if function.split("::")[0] in CORE or function in KEEP:
            continue
        chosen.append(function)
        rest -= seconds
    return sorted(chosen)


def main():
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("log", help="output of a whole run with --durations=0")
    parser.add_argument(
        "--budget",
        type=float,
        default=0.4,
        help="the default run's share of the whole run's time (default 0.4)",
    )
    args = parser.parse_args()
    with open(args.log) as file:
        times = function_times(file)
    chosen = select(times, args.budget)
    total = sum(times.values())
    kept = total - sum(times[f] for f in chosen)
    print(
        "# The slow tier: run with `pytest --full` (CI does). Chosen by\n"
        "# tests/select_slow_tests.py (see there) from a whole run's durations:\n"
        f"# {len(chosen)} of {len(times)} test functions, {total - kept:.0f} of "
        f"{total:.0f} s;\n# the default run keeps {kept:.0f} s "
        f"(budget {args.budget:.0%})."
    )
    for function in chosen:
        print(f"{function}  # {times[function]:.1f} s")


if __name__ == "__main__":
    main()
