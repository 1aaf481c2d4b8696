"""lineax as most users run it: JAX's default configuration, x64 disabled (the rest
of the suite enables x64 in conftest), with standard dtype promotion. Reviewed:
every solver through `linear_solve`, `jit`, `vmap`, `grad`, `jvp` and `jacfwd`
on float32 operators built from NumPy float64, integer and boolean arrays and
Python scalars; float16/bfloat16 and complex64 inputs; right-hand sides from 0
to 1e30; unreachable tolerances and tiny `max_steps`; the dtypes of values,
stats, states and gradients. Only the defects found have tests here; values are
compared with NumPy in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import float32_user

import lineax as lx


def test_a_structure_declared_with_a_numpy_float64_dtype_is_float32():
    # `ShapeDtypeStruct(x.shape, x.dtype)` for a NumPy float64 `x`: the structure
    # kept float64, which no computation produces with x64 disabled, so every
    # Krylov solver rejected a `FunctionLinearOperator` built with it ("input and
    # output structures ... the same"), and `M + IdentityLinearOperator(struct)`
    # failed; the published lineax solves it.
    with float32_user():
        matrix = np.array([[3.0, 1.0, 0.0], [1.0, 4.0, 1.0], [0.0, 1.0, 5.0]])
        b = np.array([1.0, -2.0, 0.5])
        struct = jax.ShapeDtypeStruct(b.shape, b.dtype)
        operator = lx.FunctionLinearOperator(
            lambda v: jnp.asarray(matrix, jnp.float32) @ v, struct
        )
        assert operator.in_structure().dtype == jnp.float32
        expected = np.linalg.solve(matrix, b)
        for solver in (lx.GMRES(rtol=1e-6, atol=1e-6), lx.LSMR(rtol=1e-6, atol=1e-6)):
            x = lx.linear_solve(operator, b, solver).value
            assert x.dtype == jnp.float32
            np.testing.assert_allclose(x, expected, rtol=1e-5)
        shifted = lx.MatrixLinearOperator(matrix) + lx.IdentityLinearOperator(struct)
        x = lx.linear_solve(shifted, b).value
        np.testing.assert_allclose(x, np.linalg.solve(matrix + np.eye(3), b), rtol=1e-5)


_KRYLOV = (
    lx.CG,
    lx.MINRES,
    lx.GMRES,
    lx.FGMRES,
    lx.BiCGStab,
    lx.LSMR,
    lx.FlexibleCG,
    lx.PipelinedCG,
)


def test_numpy_and_jax_scalars_as_tolerances_and_step_counts():
    # `rtol=10 * jnp.finfo(jnp.float32).eps` is a NumPy float32, `jnp.float32(...)`
    # a 0-d JAX array, `np.prod(shape)` a NumPy int64: every Krylov solver raised
    # a TypeError/ValueError ("must be a Python float", "must be None or a
    # nonnegative int"), SVD and Diagonal kept the array as static data; the
    # published lineax accepts them.
    # (Hence the `pyright: ignore`s: Python scalars are typed.)
    with float32_user():
        eps = jnp.finfo(jnp.float32).eps
        for cls in _KRYLOV:
            solver = cls(rtol=10 * eps, atol=jnp.float32(1e-6), max_steps=np.int64(7))  # pyright: ignore[reportArgumentType]
            assert type(solver.rtol) is float and type(solver.atol) is float
            assert type(solver.max_steps) is int
        assert type(lx.LSMR(1e-5, 1e-5, conlim=np.float32(1e6)).conlim) is float  # pyright: ignore[reportArgumentType]
        for solver in (lx.SVD(rcond=jnp.float32(1e-3)), lx.Diagonal(rcond=eps)):  # pyright: ignore[reportArgumentType]
            assert type(solver.rcond) is float
        matrix = np.array([[4.0, 1.0], [1.0, 3.0]])
        b = np.array([1.0, 2.0])
        solver = lx.GMRES(rtol=10 * eps, atol=10 * eps, max_steps=np.int64(10))  # pyright: ignore[reportArgumentType]
        x = lx.linear_solve(lx.MatrixLinearOperator(matrix), b, solver).value
        np.testing.assert_allclose(x, np.linalg.solve(matrix, b), rtol=1e-6)


# (Equinox warns before the check runs.)
@pytest.mark.filterwarnings("ignore:A JAX array is being set as static")
def test_a_traced_rcond_is_a_clear_error():
    # `SVD(rcond=r)` inside `jit` (a traced `r`, which the published lineax
    # accepted) failed deep in JAX with a TracerBoolConversionError from the
    # `rcond >= 0` check; the tolerances of this lineax are static: a TypeError
    # naming the argument.
    with float32_user():
        for cls in (lx.SVD, lx.Diagonal):
            with pytest.raises(TypeError, match="`rcond` must be a number"):
                jax.jit(lambda r, cls=cls: cls(rcond=r).rcond)(jnp.float32(1e-3))


def test_complex_to_real_dtype_of_numpy_scalar_types():
    # `np.complex128` (a scalar type, as `jnp.complex128` is) raised a TypeError:
    # its `dtype` attribute is a descriptor, not a dtype. The published lineax
    # returns float64, as for the dtype.
    with float32_user():
        for dtype, real in (
            (np.complex128, np.float64),
            (np.complex64, np.float32),
            (np.float64, np.float64),
            (jnp.complex64, np.float32),
        ):
            assert lx.internal.complex_to_real_dtype(dtype) == real


def test_definiteness_of_a_numpy_scalar_multiple():
    # `lx.is_positive_semidefinite(op * np.float64(2.0))` (a `float` subclass)
    # raised a TypeError (NumPy bools subtracted). A NumPy scalar is an array
    # leaf, traced inside the solve, so its sign is not static: False, as for a
    # JAX scalar (and for every scalar in the published lineax); a Python number
    # keeps the tag.
    with float32_user():
        matrix = np.array([[2.0, 1.0], [1.0, 3.0]])
        operator = lx.MatrixLinearOperator(matrix, lx.positive_semidefinite_tag)
        for scale in (np.float64(2.0), np.float32(2.0), jnp.float32(2.0)):
            assert not lx.is_positive_semidefinite(operator * scale)
            assert not lx.is_positive_semidefinite(operator / scale)
        assert lx.is_positive_semidefinite(operator * 2.0)
        assert lx.is_negative_semidefinite(operator / -2)


def test_max_steps_beyond_int32_is_a_clear_error():
    # `max_steps=10**10` ("no limit"): an OverflowError from deep inside JAX at the
    # solve ("while parsing an argument to a jitted computation"), as in the
    # published lineax; steps are counted in int32.
    with float32_user():
        for cls in _KRYLOV:
            with pytest.raises(ValueError, match="`max_steps` must be at most"):
                cls(rtol=1e-5, atol=1e-5, max_steps=10**10)
        assert lx.CG(rtol=1e-5, atol=1e-5, max_steps=2**31 - 1).max_steps == 2**31 - 1


def test_an_integer_structure_is_the_default_floating_dtype():
    # `FunctionLinearOperator(fn, ShapeDtypeStruct(shape, np.int64))` (a structure
    # copied from an integer array) kept int32, and every solve failed with "converting
    # would lose precision ... `vector.astype(jnp.int32)`"; the published lineax
    # promotes it to float32, as operators' integer arrays are.
    with float32_user():
        for dtype in (np.int64, jnp.int32, bool):
            struct = jax.ShapeDtypeStruct((3,), dtype)
            operator = lx.FunctionLinearOperator(lambda x: 2 * x, struct)
            assert operator.in_structure().dtype == jnp.float32
            x = lx.linear_solve(operator, np.ones(3)).value
            np.testing.assert_allclose(x, 0.5 * np.ones(3))
            identity = lx.IdentityLinearOperator(struct)
            assert lx.linear_solve(identity, np.ones(3)).value.dtype == jnp.float32


def test_numpy_integers_as_preconditioner_and_sparse_counts():
    # `np.int64` counts (from `np.prod(shape)`, `x.shape[0] // k` on NumPy
    # values): "`block_size` must be a positive int, got np.int64(2)", and so
    # for `degree`, `lanczos_steps`, `probes` and `max_dense_size`, where the
    # solvers' step counts accept them.
    import scipy.sparse as sps

    with float32_user():
        matrix = np.diag([4.0, 5.0, 6.0, 7.0]) + 0.5
        operator = lx.MatrixLinearOperator(matrix, lx.positive_semidefinite_tag)
        two, three = np.int64(2), np.int64(3)
        lx.BlockJacobiPreconditioner(operator, two)
        lx.ChebyshevPreconditioner(operator, three, lanczos_steps=np.int64(4))
        lx.NeumannPreconditioner(operator, three)
        matrix_free = lx.FunctionLinearOperator(
            lambda x: jnp.asarray(matrix, jnp.float32) @ x,
            jax.ShapeDtypeStruct((4,), jnp.float32),
        )
        lx.JacobiPreconditioner(matrix_free, three)
        lx.SparseLinearOperator(sps.csr_matrix(matrix), max_dense_size=np.int64(99))
