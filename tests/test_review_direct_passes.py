"""Regression tests from a review of how often the direct solves read n x n data
(issue 15), as XLA:CPU compiles them: the optimised HLO's passes over n x n
arrays and copies of them, and `compiled.memory_analysis()` (deterministic),
against the closest JAX-native call.

Reviewed, and found in line with JAX (no test here), float32 and float64, n =
100: the primal LU, Cholesky, QR and SVD solves under `jit` (the same
temporaries as `jnp.linalg.solve`, `cho_solve` and `lstsq`, or fewer; one pass
more, the test of the operator's finiteness, which is a guarantee:
`[[inf, 2], [2, 4]]` solves to a finite `x`), and a solve from a `state=`
passed into `jit` (the recorded boolean, no scan of the operator: the same
temporaries as `lu_solve`).

Found and left (what a guarantee costs, or no fix found): a solve with a
transposed `MatrixLinearOperator` tests `A.T` folded with the solution, for
which XLA:CPU transposes `A` into an n x n copy (3.04 against 2.02 n^2); the
gradient of an LU solve with respect to the matrix holds 1.06 n^2 temporaries
against 0.07 for `jnp.linalg.solve`: the zero-pivot test reads the diagonal of
the raw factor after JAX's NaN `select` (fused into it), so that `select`
cannot run in place, and `lax.optimization_barrier` does not survive to XLA's
fusion.
"""

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

import lineax as lx


_N = 100


def _temp_bytes(fn, *args) -> int:
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    assert analysis is not None
    return analysis.temp_size_in_bytes


def _matrix(dtype):
    key = jax.random.key(0)
    return jax.random.normal(key, (_N, _N), dtype) + _N * jnp.eye(_N, dtype=dtype)


def test_invert_mv_holds_no_copy_of_the_factor():
    # `lx.invert(op).mv` solves from the state it made, testing the finiteness
    # that LU's `init` recorded. That test read LAPACK's column-major factor,
    # which XLA:CPU copied (transposed) into an n x n array of its own before
    # its reduction. Measured, in n^2 entries, n = 100: 3.02 (float32 and
    # float64) against 2.02 for `lu_solve(lu_factor(A), b)`; now 2.04.
    for dtype in (jnp.float32, jnp.float64):
        matrix = _matrix(dtype)
        b = jnp.ones(_N, dtype)

        def lineax_mv(a, b):
            return lx.invert(lx.MatrixLinearOperator(a), lx.LU()).mv(b)

        def jax_mv(a, b):
            return jsl.lu_solve(jsl.lu_factor(a), b)

        entry = jnp.dtype(dtype).itemsize * _N * _N
        ours = _temp_bytes(lineax_mv, matrix, b) / entry
        theirs = _temp_bytes(jax_mv, matrix, b) / entry
        assert ours < theirs + 0.1, (dtype, ours, theirs)


def test_lu_state_records_the_finiteness_of_its_own_matrix():
    # The recorded test now reads a `MatrixLinearOperator`'s matrix instead of
    # the factor: a non-finite entry that substitution hides (`x / inf = 0`)
    # must still fail a solve from the state, also when the operator given
    # with the state is another, finite one (Optimistix's Chord).
    a = jnp.array([[jnp.inf, 2.0], [2.0, 4.0]])
    b = jnp.array([0.0, 1.0])
    finite = lx.MatrixLinearOperator(jnp.array([[1.0, 2.0], [2.0, 5.0]]))
    for dtype in (jnp.float32, jnp.float64):
        state = lx.LU().init(lx.MatrixLinearOperator(a.astype(dtype)), {})
        cast = lx.MatrixLinearOperator(finite.matrix.astype(dtype))
        # What it gave before the change: the failure path examines the operator
        # passed, so a finite one with the state of a non-finite one is reported
        # as `singular`.
        expected = (lx.RESULTS.nonfinite_input, lx.RESULTS.singular)
        for operator, result in zip(
            (lx.MatrixLinearOperator(a.astype(dtype)), cast), expected
        ):
            sol = jax.jit(
                lambda op, s, b: lx.linear_solve(op, b, lx.LU(), state=s, throw=False)
            )(operator, state, b.astype(dtype))
            assert sol.result == result


def test_lu_init_computes_both_norms_from_one_magnitude():
    # LU's `init` records the 1-norms of the matrix and of its transpose (for the
    # condition estimate). `norm1(matrix.T)` made XLA:CPU a transposed n x n
    # copy of `abs(matrix)` next to the one of `norm1(matrix)`. Measured, the
    # state returned from `jit`, in n^2 entries, n = 100: 2.03 -> 1.04 (float32
    # and float64); `lu_factor`: 1.0.
    for dtype in (jnp.float32, jnp.float64):
        matrix = _matrix(dtype)

        def init(a):
            return lx.LU().init(lx.MatrixLinearOperator(a), {})

        entry = jnp.dtype(dtype).itemsize * _N * _N
        ours = _temp_bytes(init, matrix) / entry
        theirs = _temp_bytes(jsl.lu_factor, matrix) / entry
        assert ours < theirs + 0.1, (dtype, ours, theirs)
