"""Adversarial checks of the preconditioners and `SparseLinearOperator`, as users
build them: inside `jax.jit`, from SciPy matrices, with Python-number parameters.
Each test here failed before the fix it protects."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx


def _spd(n: int, seed: int = 0) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(n, n))
    return a @ a.T + n * np.eye(n)


#
# Parameters given as Python numbers, with the preconditioner built inside `jit`.
#


@pytest.mark.parametrize(
    "make",
    [
        lambda op: lx.SSORPreconditioner(op),
        lambda op: lx.SSORPreconditioner(op, 1.3),
        lambda op: lx.NeumannPreconditioner(op, 3, 0.05),
    ],
    ids=["ssor-default", "ssor-omega", "neumann-scale"],
)
def test_preconditioner_with_python_number_parameters_builds_inside_jit(make):
    # Under `jit`, `jnp.asarray(1.3)` is traced: the concrete checks of `omega`
    # and `scale` called `float`/`complex` on it and raised a
    # ConcretizationTypeError, so SSOR could not be built under `jit` at all.
    matrix = _spd(5)

    def apply(a):
        vector = jnp.arange(1.0, 6.0)
        op = lx.MatrixLinearOperator(a, lx.positive_semidefinite_tag)
        return make(op).mv(vector)

    np.testing.assert_allclose(jax.jit(apply)(matrix), apply(matrix), rtol=1e-14)


def test_bad_python_number_parameters_are_named_errors_inside_jit():
    op = lx.MatrixLinearOperator(jnp.asarray(_spd(4)), lx.positive_semidefinite_tag)
    with pytest.raises(ValueError, match="omega"):
        jax.jit(lambda o: lx.SSORPreconditioner(o, 2.5).mv(jnp.ones(4)))(op)
    with pytest.raises(ValueError, match="scale"):
        jax.jit(lambda o: lx.NeumannPreconditioner(o, 2, -1.0).mv(jnp.ones(4)))(op)
