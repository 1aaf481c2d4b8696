"""Test configuration: float64, strict dtype promotion, beartype-checked jaxtyping
annotations in the library, and hypothesis profiles."""

import os

import jax


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
hypothesis.settings.load_profile(
    "exhaustive" if os.environ.get("LINEAX_EXHAUSTIVE") else "ci"
)


def pytest_collection_modifyitems(config, items):
    import pytest

    if os.environ.get("LINEAX_EXHAUSTIVE"):
        return
    skip = pytest.mark.skip(reason="exhaustive grid: set LINEAX_EXHAUSTIVE=1 to run")
    for item in items:
        if "exhaustive" in item.keywords:
            item.add_marker(skip)
