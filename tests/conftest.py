"""Test configuration: float64, strict dtype and rank promotion, hypothesis profiles,
the `LINEAX_EXHAUSTIVE` switch, and runtime type checking of the library.

The library's annotations are checked at run time with beartype
(`--jaxtyping-packages=lineax,beartype.beartype` in pyproject.toml's `addopts`,
as Optimistix, Diffrax and Equinox do). A wrongly typed argument then fails the
type check before the library's own message: `raises_message` accepts that in
the tests of those messages, and `.ci/run` runs those tests once more without
type checking, where the library's message itself is checked."""

import contextlib
import faulthandler
import gc
import importlib.metadata
import os
import re
import shutil
import tempfile


# XLA:CPU's LLVM backend optimises each compiled kernel; at level 0 it skips most of
# that work. The suite compiles thousands of small programs and runs each only a few
# times: this cuts the large files' CPU time by 13-21% (XLA compiling dominates).
# XLA:CPU's MLIR fusion emitters (`xla_cpu_use_fusion_emitters`, the default) cost
# about 2.5x the compile time of the older elemental emitters that the flag falls
# back to: 33 -> 17 ms for a one-line program (each eager operation of a new shape
# is one), 5.4 -> 2.2 s for the reverse-mode FGMRES, LSMR and LU solves of an 8x8
# matrix, with bitwise-equal results there; the tests' CPU time (the same 770
# tests, in the pytest processes) 714 -> 400 s. Both flags change only how XLA
# turns the HLO program into machine code, not the program (the compile-size
# guard and the precision guard read that, and are unaffected). Set here, before
# JAX starts its backend, so that the subprocesses the tests start inherit them; a
# value the user set in `XLA_FLAGS` wins. `tests/test_examples.py` removes them
# again for one of the eleven examples (all with LINEAX_EXHAUSTIVE=1), which runs
# at XLA's defaults, as users' code does (with the scripts of
# `run_at_default_flags`, the places in the default run compiled with full LLVM
# optimisation and the fusion emitters).
# `xla_cpu_multi_thread_eigen=false` runs XLA:CPU's Eigen kernels (dot products,
# convolutions) on one thread: the tests' arrays are tiny, and with two workers on
# two cores the pool's threads only compete for them (the default run of
# test_solve/test_jvp/test_direct_results: 63.3 -> 61.3 s CPU, 57 -> 45 s wall);
# it changes how the program runs, not the program.
# `xla_cpu_parallel_codegen_split_count=1` hands LLVM each program's module in one
# piece: by default XLA:CPU splits it into parts, compiled on a thread pool and
# linked, which for the tests' small programs costs more than it saves, and with
# two workers on two cores no thread is free to run a part. The reverse-mode CG,
# GMRES, BiCGStab, LSMR and MINRES solves of an 8x8 matrix: 5.9-6.3 -> 4.7-5.2 s
# of CPU (three runs each, bitwise-equal results); test_krylov.py and
# test_preconditioners.py (`-n 0`): 142.8 -> 120.9 s of CPU; test_jvp.py and
# test_throw.py, alternated: 71.0, 68.2 -> 64.3, 64.0 s. Like the others, it
# changes how XLA makes machine code, not the program.
# The flags added here travel to pytest-xdist's workers in this environment variable.
# XLA aborts the process on a flag it does not know: jaxlib 0.11 (installed on
# Python 3.12 by `jax>=0.10.2`) has no `xla_cpu_use_fusion_emitters` ("F...
# parse_flags_from_env.cc:234] Unknown flag in XLA_FLAGS"), and every test
# worker crashed; it is added for the jaxlib versions that have it. (The version
# read from the installed package's metadata, without starting XLA.)
_ADDED_XLA_FLAGS_ENV = "LINEAX_TEST_ADDED_XLA_FLAGS"
if _ADDED_XLA_FLAGS_ENV not in os.environ:
    _user_flags = os.environ.get("XLA_FLAGS", "")
    _jaxlib = tuple(
        int(part) for part in importlib.metadata.version("jaxlib").split(".")[:2]
    )
    _added = [
        flag
        for flag in (
            "--xla_backend_optimization_level=0",
            *(("--xla_cpu_use_fusion_emitters=false",) if _jaxlib < (0, 11) else ()),
            "--xla_cpu_multi_thread_eigen=false",
            "--xla_cpu_parallel_codegen_split_count=1",
        )
        if flag.split("=")[0] not in _user_flags
    ]
    os.environ["XLA_FLAGS"] = " ".join([_user_flags, *_added]).strip()
    os.environ[_ADDED_XLA_FLAGS_ENV] = " ".join(_added)
ADDED_XLA_FLAGS = os.environ[_ADDED_XLA_FLAGS_ENV].split()

# One OpenBLAS thread (NumPy's and SciPy's, which JAX's CPU LAPACK calls use too),
# unless the user chose: with two pytest-xdist workers on two cores its extra
# threads only spin-wait for a core, e.g. 4.2 -> 0.4 s of CPU for the 512x512 SVD
# solve of `test_svd_accuracy_ill_conditioned_float32`. Values are unchanged up to
# the rounding of a blocked product (the tests' tolerances). Set before NumPy loads
# OpenBLAS in this process (when it has not yet) and inherited by the workers and
# subprocesses.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jaxtyping
import pytest


# The one read of `LINEAX_EXHAUSTIVE` (`from conftest import EXHAUSTIVE`): the
# large parameter grids and the long hypothesis profile.
EXHAUSTIVE = bool(os.environ.get("LINEAX_EXHAUSTIVE"))

# Whether the library is type-checked at run time (set by `pytest_configure`).
TYPECHECKED = False


# The run's compilation cache (see `_use_compilation_cache`): made by the first
# process (pytest itself, or the pytest-xdist controller) and passed to the worker
# processes through this environment variable.
_CACHE_ENV = "LINEAX_TEST_COMPILATION_CACHE"


def pytest_configure(config):
    global TYPECHECKED
    TYPECHECKED = bool(config.getoption("jaxtyping_packages", None))
    if _CACHE_ENV not in os.environ:
        os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="lineax-tests-jax-cache-")
        config._lineax_cache_dir = os.environ[_CACHE_ENV]
    _use_compilation_cache(os.environ[_CACHE_ENV])
    # JAX writes a cache entry in place (`write_bytes`, no lock unless the cache has
    # a size limit and `filelock` is installed), so one pytest-xdist worker can read
    # an entry that the other is still writing. JAX then warns and compiles the
    # program itself, which is correct; under `filterwarnings = error` the warning
    # would fail the test (or the collection of a module) instead. Only the cache's
    # read and write warnings are let through: they concern this run's own
    # temporary cache, never a result.
    for message in (
        "Error reading persistent compilation cache entry",
        "Error writing persistent compilation cache entry",
    ):
        config.addinivalue_line("filterwarnings", f"ignore:{message}:UserWarning")


def pytest_unconfigure(config):
    cache_dir = getattr(config, "_lineax_cache_dir", None)
    if cache_dir is not None:
        shutil.rmtree(cache_dir, ignore_errors=True)
        del os.environ[_CACHE_ENV]


def _use_compilation_cache(cache_dir):
    """JAX's persistent compilation cache, for this run only (a temporary folder,
    removed at the end; shared by pytest-xdist's workers).

    Many tests build the same program from new Python functions (a `lambda` per
    case, the same solve in several modules), and `_free_compiled_code` drops the
    in-memory caches after each module: the XLA compile of an identical program is
    then loaded from disk instead of redone (about a third of the compiles; JAX
    never stores programs with host callbacks). Tracing still happens every time,
    so what a test checks is unchanged."""
    if not cache_dir:  # `LINEAX_TEST_COMPILATION_CACHE=` turns it off
        return
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


@contextlib.contextmanager
def raises_message(error, match):
    """`pytest.raises(error, match=match)`, for the library's messages about bad
    arguments; under runtime type checking a `jaxtyping.TypeCheckError` (a
    `TypeError` naming the argument) may come first for a wrongly typed one."""
    with pytest.raises(Exception) as info:
        yield info
    if TYPECHECKED and isinstance(info.value, jaxtyping.TypeCheckError):
        return
    assert isinstance(info.value, error), repr(info.value)
    assert re.search(match, str(info.value)), (match, str(info.value))


def run_at_default_flags(code: str, timeout: float = 300):
    """Run the Python `code` in a fresh process with this test run's lineax (the
    source tree or an installed wheel) and XLA's default flags, as users' code
    runs (the flags this file adds removed): some defects show only there."""
    from helpers import run_python  # (not at import: `helpers` imports this file)

    flags = os.environ.get("XLA_FLAGS", "").split()
    default = " ".join(f for f in flags if f not in ADDED_XLA_FLAGS)
    return run_python(code, env={"XLA_FLAGS": default}, timeout=timeout)


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

import hypothesis  # noqa: E402


hypothesis.settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(hypothesis.HealthCheck),
    print_blob=True,
)
hypothesis.settings.register_profile(
    "exhaustive",
    max_examples=int(os.environ.get("LINEAX_EXAMPLES", "2000")),
    deadline=None,
    derandomize=False,
    suppress_health_check=list(hypothesis.HealthCheck),
    print_blob=True,
)
hypothesis.settings.load_profile("exhaustive" if EXHAUSTIVE else "ci")


def pytest_collection_finish(session):
    """Collect less often: tracing makes millions of short-lived objects, and at
    Python's default thresholds (700, 10, 10) each full collection scans every
    object of JAX, lineax and the collected test modules, which live for the whole
    run. `gc.freeze()` leaves those out of the scans, and higher thresholds run
    the collector less often; `_free_compiled_code` still collects fully after
    each module. test_solve.py and test_vmap_transpose.py (-n 0, side by side on
    the loaded machine): 58.3 -> 55.9 s CPU, of which the collector 8.2 -> 1.9 s
    (wall)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 100)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_code():
    """Drop JAX's compiled executables after each test module.

    Each XLA:CPU executable keeps a few memory mappings for its JIT-compiled code,
    and the suite compiles thousands of them in one process: past Linux's default
    `vm.max_map_count` (65530) LLVM aborts the whole process in the middle of a
    compile (seen as a "Fatal Python error: Aborted" at about 90% of the run).
    Clearing the caches releases the mappings; a module's shared jitted
    functions still serve all of its tests."""
    yield
    jax.clear_caches()
    gc.collect()


# A watchdog per test: a solver loop that never ends inside `jit` holds the GIL in
# XLA's code, where no Python-level timeout can interrupt it, and would stall the
# whole run (CI's only bound is an hour). `faulthandler`'s watchdog is a C thread:
# past the limit it prints every thread's stack and ends the process, which
# pytest-xdist reports as a crashed worker naming the test. The tests that can
# loop also run bounded by `max_steps`, and the edge-input grids in subprocesses
# with their own timeouts; this covers every other test that runs a solver.
# (`--max-worker-restart=2` in `addopts` bounds the run that a hang can cost:
# pytest-xdist would otherwise hand the rest of the file to up to eight new
# workers.) `LINEAX_TEST_TIMEOUT` sets the limit, in seconds.
TEST_TIMEOUT = float(os.environ.get("LINEAX_TEST_TIMEOUT", "600"))


@pytest.fixture(autouse=True)
def _watchdog():
    faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# Each test file's CPU seconds in the default run (on the 2-core machine, summed
# over its tests by pytest's `--durations=0`, of the run of 2026-11-28 and scaled by
# the files' own runs before and after the changes since; the test_review_* files
# added late that day from that day's last run, scaled alike; for the files that run
# a subprocess, that process's wall time; only the order matters). Two
# pytest-xdist workers take whole files from a queue (`--dist loadfile
# --no-loadscope-reorder`): handing out the longest files first lets both finish
# within about the shortest file of each other, where an unlucky order leaves one
# core idle for the last long file. A file missing here counts as
# `_DEFAULT_FILE_SECONDS`.
_FILE_SECONDS = {
    "test_krylov.py": 55,
    "test_structured.py": 55,
    "test_clients.py": 48,  # with a Diffrax subprocess at default flags
    "test_examples.py": 39,  # two subprocesses, one at XLA's default flags
    "test_operators.py": 43,
    "test_preconditioners.py": 40,
    "test_review_export.py": 37,
    "test_review_gpu.py": 37,
    "test_review_sharded.py": 25,  # a subprocess
    "test_sharded.py": 28,  # a subprocess
    "test_solvers_adversarial.py": 32,
    "test_jvp.py": 31,
    "test_review_krylov_complex.py": 30,
    "test_krylov_termination.py": 30,  # a subprocess
    "test_solve.py": 28,
    "test_review_derivs.py": 28,
    "test_incomplete.py": 27,
    "test_flexible.py": 26,
    "test_real_to_complex.py": 26,
    "test_user_inputs.py": 26,
    "test_direct_results.py": 25,  # with the mixed real/complex operators
    "test_review_structured.py": 25,
    "test_krylov_stats.py": 24,
    "test_review_lstsq.py": 24,
    "test_docs_snippets.py": 16,  # a subprocess
    "test_preconditioners_adversarial.py": 16,
    "test_eager.py": 15,  # a subprocess (EQX_ON_ERROR)
    "test_vmap_transpose.py": 13,
    "test_compile_guard.py": 11,
    "test_derivatives_adversarial.py": 11,
    "test_review_eager.py": 11,
    "test_throw.py": 11,
    "test_review_algebra.py": 11,
    "test_review_higher_order.py": 30,
    "test_review_warm_start.py": 15,
    "test_review_precond.py": 24,
    "test_review_state.py": 25,
    "test_review_auto_tags.py": 18,
    "test_krylov_runtime.py": 10,
    "test_operators_adversarial.py": 10,
    "test_docs_names.py": 9,  # a subprocess (mkdocs)
    "test_pipelined_cg.py": 9,
    "test_review_diff.py": 9,
    "test_derivative_runtime.py": 8,
    "test_direct_adversarial.py": 8,
    "test_internal.py": 8,
    "test_review_workflows.py": 8,
    "test_review_memory.py": 8,
    "test_batching_adversarial.py": 7,
    "test_fast_paths_adversarial.py": 7,
    "test_predicates.py": 7,
    "test_properties_user_inputs.py": 7,
    "test_review_clients_lineax.py": 7,
    "test_review_external.py": 7,
    "test_review_x32.py": 7,
    "test_review_extend.py": 7,
    "test_scaling.py": 6,
    "test_review_eager_speed.py": 6,
    "test_krylov_kernels.py": 5,
    "test_properties.py": 5,
    "test_review_docs.py": 5,
    "test_review_transforms.py": 5,
    "test_review_debug_config.py": 28,  # two subprocesses
    "test_watchdog.py": 5,  # a subprocess
    "test_errors.py": 4,
    "test_precision.py": 4,
    "test_review_errors.py": 4,
    "test_review_recompile.py": 4,
    "test_krylov_scale.py": 3,
    "test_review_direct_passes.py": 3,
    "test_review_mixed_dtypes.py": 2,
    "test_review_numerics.py": 2,
    "test_review_norms.py": 16,
    "test_review_runtime.py": 2,
    "test_auto_adversarial.py": 1,
    "test_dense_kernels.py": 1,
    # Added 2026-11-29 (they counted as `_DEFAULT_FILE_SECONDS`, which placed them
    # among the last files handed out, where either could leave the other worker
    # idle for half a minute): their `-n 0` CPU time (user + sys, 56 s and 41 s,
    # less pytest's 4 s start), scaled by 0.65, the median ratio of this table to
    # the same measurement of ten of the files above.
    "test_review_caches.py": 34,  # two subprocesses at XLA's default flags
    "test_review_fnop.py": 24,
}
_DEFAULT_FILE_SECONDS = 10


def _longest_files_first(items):
    """Reorder `items` file by file, longest file first (stable within a file)."""
    order = {}
    for item in items:
        order.setdefault(item.path, len(order))

    def key(item):
        seconds = _FILE_SECONDS.get(item.path.name, _DEFAULT_FILE_SECONDS)
        return -seconds, order[item.path]

    items.sort(key=key)


def pytest_addoption(parser):
    parser.addoption(
        "--full",
        action="store_true",
        help="lineax: run every test, those of the slow tier (tests/slow_tests.txt) "
        "too, as CI does",
    )


# The slow tier: the test functions (every case of each) listed in
# `tests/slow_tests.txt`, run with `--full` (as CI does) or LINEAX_EXHAUSTIVE=1 and
# left out of the default run, which they would make about 2.5 times as long (issue
# 15 asks for a default run of at most 5 minutes on two cores). They are chosen by
# time, not by kind, by `tests/select_slow_tests.py` from a whole run's
# `--durations=0` (see its docstring): the most expensive functions, until the rest
# of the run fits its budget, except in the files of the core tests and a few
# functions it keeps. Most files keep their cheaper tests in the default run.
SLOW_TESTS_FILE = os.path.join(os.path.dirname(__file__), "slow_tests.txt")


def read_slow_tests(path: str = SLOW_TESTS_FILE) -> set[str]:
    """The slow tier's entries, `file.py::function` (comments and blanks skipped)."""
    with open(path) as file:
        lines = (line.split("#")[0].strip() for line in file)
        return {line for line in lines if line}


def _function_id(item) -> str:
    """`file.py::function` (or `file.py::Class::function`) of a collected test."""
    name = item.originalname if hasattr(item, "originalname") else item.name
    parts = item.nodeid.split("::")
    return "::".join([item.path.name, *parts[1:-1], name])


def pytest_collection_modifyitems(config, items):
    _longest_files_first(items)
    if EXHAUSTIVE:
        return
    full = config.getoption("full")
    slow = read_slow_tests()
    skip_slow = pytest.mark.skip(reason="slow tier: run with --full (as CI does)")
    skip = pytest.mark.skip(reason="exhaustive grid: set LINEAX_EXHAUSTIVE=1 to run")
    for item in items:
        function = _function_id(item)
        if function in slow:
            item.add_marker(pytest.mark.slow)
            if not full:
                item.add_marker(skip_slow)
        if "exhaustive" in item.keywords:
            item.add_marker(skip)
