"""Operators mixing real and complex leaves, probed as users build them (a
review of the realified solve): PyTree operators whose rows compute another
dtype than they declare, wrappers around a mixed operator. Values against
NumPy's float64 pseudoinverse of the stacked real matrix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx


def _complex(rng, *shape):
    return rng.normal(size=shape) + 1j * rng.normal(size=shape)


def test_krylov_on_a_row_declared_float32_computing_complex128():
    # Input {"a", "c"} complex128 (from the first row); row "v" is declared
    # float32 but its complex128 blocks make it compute complex128. LSMR's
    # closure-converted operator was traced with the computed dtypes and called
    # with the float32 right-hand side: a `ValueError` ("Closure-converted
    # function called with different dynamic arguments"); SVD solved it.
    rng = np.random.default_rng(0)
    blocks = {
        "u": {"a": _complex(rng, 3, 2), "c": _complex(rng, 3, 2)},
        "v": {
            "a": np.asarray(rng.normal(size=(2, 2)), np.float32),
            "c": np.asarray(_complex(rng, 2, 2), np.complex64),
        },
    }
    out = {
        "u": jax.ShapeDtypeStruct((3,), jnp.complex128),
        "v": jax.ShapeDtypeStruct((2,), jnp.float32),
    }
    operator = lx.PyTreeLinearOperator(jax.tree.map(jnp.asarray, blocks), out)
    b = {"u": jnp.asarray(_complex(rng, 3)), "v": jnp.asarray([1.0, -2.0], "f4")}
    # The complex operator (this one is complex-linear): its pseudoinverse.
    matrix = np.block(
        [[blocks[o][i].astype(complex) for i in ("a", "c")] for o in ("u", "v")]
    )
    rhs = np.concatenate([np.asarray(b["u"]), np.asarray(b["v"], float)])
    expected = np.linalg.pinv(matrix) @ rhs
    for solver in (lx.LSMR(rtol=1e-12, atol=1e-12), lx.SVD()):
        x = lx.linear_solve(operator, b, solver).value
        got = np.concatenate([x["a"], x["c"]])
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)


def test_an_initial_guess_of_another_structure_is_the_solvers_error():
    # A list for a complex array input of an operator with real outputs
    # (complex -> real, only real-linear): the realified options split it
    # with `jnp.real`, a `TypeError` ("real requires ndarray or scalar
    # arguments"); an operator of one dtype says that `y0` has the wrong
    # structure, and so does this one now.
    matrix = jnp.asarray(np.array([[1.0, 2.0], [0.5, -1.0], [3.0, 1.0]]) * (1 + 0.5j))
    operator = lx.FunctionLinearOperator(
        lambda z: jnp.real(matrix @ z), jax.ShapeDtypeStruct((2,), jnp.complex128)
    )
    solver = lx.LSMR(rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="`y0` option"):
        lx.linear_solve(operator, jnp.ones(3), solver, options={"y0": [1.0, 2j]})
