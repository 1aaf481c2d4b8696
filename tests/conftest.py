"""Test configuration: float64, strict dtype and rank promotion, hypothesis profiles,
and the `LINEAX_EXHAUSTIVE` switch.

Runtime type checking of the library's jaxtyping annotations with beartype is
opt-in (`pytest --jaxtyping-packages=lineax,beartype.beartype`, see pyproject.toml):
it also rejects the wrongly typed inputs whose own error messages the tests check."""

import gc
import os

import jax
import pytest


# The one read of `LINEAX_EXHAUSTIVE` (`from conftest import EXHAUSTIVE`): the
# large parameter grids and the long hypothesis profile.
EXHAUSTIVE = bool(os.environ.get("LINEAX_EXHAUSTIVE"))

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

import hypothesis  # noqa: E402


hypothesis.settings.register_profile(
    "ci",
    max_examples=25,
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


def pytest_collection_modifyitems(config, items):
    if EXHAUSTIVE:
        return
    skip = pytest.mark.skip(reason="exhaustive grid: set LINEAX_EXHAUSTIVE=1 to run")
    for item in items:
        if "exhaustive" in item.keywords:
            item.add_marker(skip)
