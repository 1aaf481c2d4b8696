"""The power-of-two scale of a Krylov solve's right-hand side, read from exponent
bits (`_krylov._power_of_two_scale`), against NumPy's `frexp`/`ldexp`."""

import jax.numpy as jnp
import numpy as np
import pytest

from lineax._solver._krylov import _power_of_two_scale


def _frexp_scale(values, dtype):
    big = np.max(np.abs(np.asarray(values, np.float64)))
    if not (big > 0 and np.isfinite(big)):
        return 1.0
    # Clamped to where the scale and its inverse are normal numbers of `dtype`.
    info = jnp.finfo(dtype)
    lo, hi = max(info.minexp, 1 - info.maxexp), min(info.maxexp - 1, -info.minexp)
    return float(np.ldexp(1.0, np.clip(np.frexp(big)[1], lo, hi)))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_power_of_two_scale_matches_frexp(dtype):
    info = jnp.finfo(dtype)
    magnitudes = [1.0, 0.5, 0.75, 1.5, 3.0, 1e-3, 7.0, float(info.smallest_normal)]
    magnitudes += [float(info.max) / 3, 2.0 ** (info.maxexp - 2)]
    if dtype == jnp.float16:
        # Subnormal in half precision, normal in the single precision of the test.
        magnitudes += [float(info.smallest_normal) / 3, 6e-8]
    rng = np.random.default_rng(0)
    exponents = rng.integers(info.minexp + 2, info.maxexp - 2, 20)
    magnitudes += list(rng.uniform(0.5, 1.0, 20) * 2.0**exponents)
    for m in magnitudes:
        b = jnp.asarray([m, -m / 3, 0.0], dtype)
        expected = _frexp_scale(b.astype(jnp.float64), dtype)
        scale, inverse = _power_of_two_scale(b, dtype)
        assert scale.dtype == dtype and inverse.dtype == dtype
        assert float(scale) == expected, m
        if float(info.smallest_normal) <= 1 / expected <= float(info.max):
            # (Beyond that the inverse is flushed to zero or overflows, as
            # `1 / scale` does.)
            assert float(inverse) == 1 / expected, m


def test_power_of_two_scale_of_a_vector_near_the_largest_float():
    # Its largest entry at 2^127 or more in float32: the scale was 2^128 = inf
    # (and its inverse zero), so every Krylov solve of it gave NaN and "singular".
    for dtype in (jnp.float32, jnp.float64):
        big = float(jnp.finfo(dtype).max) / 1.1
        scale, inverse = _power_of_two_scale(jnp.asarray([big, 1.0], dtype), dtype)
        assert np.isfinite(float(scale)) and float(inverse) > 0
        assert float(scale) * float(inverse) == 1.0
        assert big / float(scale) < 8


@pytest.mark.parametrize("value", [0.0, np.inf, -np.inf, np.nan])
def test_power_of_two_scale_is_one_for_zero_or_nonfinite(value):
    for dtype in (jnp.float16, jnp.float32, jnp.float64):
        b = jnp.asarray([value, 0.0], dtype)
        assert float(_power_of_two_scale(b, dtype)[0]) == 1.0


def test_power_of_two_scale_of_a_pytree_with_complex_leaves():
    b = (jnp.asarray([3.0 + 4.0j], jnp.complex64), jnp.asarray([2.0], jnp.float32))
    # max |b| = 5 = 0.625 * 2^3
    assert float(_power_of_two_scale(b, jnp.float32)[0]) == 8.0
    assert float(_power_of_two_scale([], jnp.float32)[1]) == 1.0


def test_operator_scale_is_a_clamped_power_of_two():
    # The operator's scale (`_krylov.operator_scale`, from a product with it):
    # `2^s` above the largest entry, with `2^s` and `2^-s` both normal numbers of
    # the dtype. In float16 an operator of norm 2e4 once got no scaling at all
    # (2^16 is not a float16), and GMRES, MINRES and LSMR then failed.
    from lineax._solver._krylov import operator_scale

    for dtype, value, expected in [
        (jnp.float32, 1.0, 2.0),
        (jnp.float32, 0.3, 0.5),
        (jnp.float32, 3e20, 2.0**69),
        (jnp.float64, 1e-200, 2.0**-664),
        (jnp.float16, 4e4, 2.0**14),
        (jnp.float16, 3.0, 4.0),
        (jnp.float32, 3e38, 2.0**126),
    ]:
        scale, inverse = operator_scale(jnp.asarray([value, -value / 3], dtype), dtype)
        assert float(scale) == expected and float(inverse) == 1 / expected, value
    for value in (0.0, np.inf, np.nan):
        scale, inverse = operator_scale(
            jnp.asarray([value, 0.0], jnp.float32), jnp.float32
        )
        assert float(scale) == float(inverse) == 1.0
    # Complex leaves: the largest real or imaginary part (here 5).
    tree = (jnp.asarray([3 + 4j], jnp.complex64), jnp.asarray([-5j], jnp.complex64))
    assert float(operator_scale(tree, jnp.float32)[0]) == 8.0
