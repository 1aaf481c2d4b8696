"""Regression tests from a randomized review of operator expression trees: a
seeded generator of trees (depth up to 3) whose leaves are every public operator
(matrix, PyTree with dict and tuple structures, function, Jacobian with
`jac=None` and `"bwd"`, identity between distinct structures, diagonal,
tridiagonal, sparse BCOO/BCSR, Kronecker, low-rank update, block-diagonal,
block), real and complex, each with a random subset of the tags its matrix
truly has, and whose nodes are `+`, `-`, unary `-`, `*`/`/` by Python floats
(of either sign), complex numbers, ints and arrays, `@`, `.T`,
`.transpose()`, `lx.conj`, `lx.TaggedLinearOperator`, `lx.materialise`,
`lx.linearise` and `lx.invert`, built together with the dense NumPy matrix
each tree stands for. About 630 trees (150 of them under strict dtype
promotion), and 220 hand-built sums and products of real operators with
complex scalars (strict), were checked against that matrix:
`mv` (eager and under `eqx.filter_jit`), `as_matrix`, the structures and
sizes, `transpose` (and its predicates), `lx.diagonal`, `lx.tridiagonal`,
`materialise`, `linearise` and `conj` (values, structures, no predicate
lost), a PyTree flatten/unflatten round trip, every structure predicate for
soundness (never claimed of a node whose matrix lacks the property), and
`AutoLinearSolver` with each `well_posed` against `numpy.linalg.solve`/`pinv`
under `eqx.filter_jit` with the tree as an argument, `vmap` over right-hand
sides, and `jvp` with respect to every array leaf against NumPy's derivative
of the inverse (along tangents that keep the tags' promises).

Found and left (documented): a complex operator tagged positive or negative
semidefinite (Hermitian) is `is_symmetric`, and so are its complex multiples
and its sums with symmetric operators, though none equals its transpose;
derivatives along tangents that break a tag's promise (a non-symmetric tangent
of a symmetric-tagged operator); `lx.tridiagonal` of a rectangular operator
(documented for square ones) returns bands of mismatched lengths where it is not
tagged, and raises where it is. Operators mixing real and complex leaves
(the realified solve) were left out.

Each test here failed before the fix it protects; `test_random_trees` keeps a
small sample of the generator. Small sizes.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from helpers import PREDICATES

import lineax as lx


_S3 = jax.ShapeDtypeStruct((3,), jnp.float64)
_S5 = jax.ShapeDtypeStruct((5,), jnp.float64)


def test_unit_diagonal_of_a_product_stops_at_its_inner_size():
    # The 5x3 identity (zero-padding) after a 3x5 unit lower-triangular matrix is
    # the singular 5x5 `[B; 0]`: diagonal (1, 1, 1, 0, 0). Both factors have a
    # unit diagonal and are lower triangular, and the product was claimed to
    # have a unit diagonal: `Auto` picked `Triangular` reading no diagonal and
    # returned x = (1, 1, 1, 4, 5) as `successful`, residual 9.
    # (lineax 0.1.1 crashed on the rectangular identity, and gave the same
    # wrong answer for the product of two user-tagged rectangular matrices.)
    upper_part = jnp.tril(jnp.ones((3, 5)), -1) + jnp.eye(3, 5)
    unit_lower = (lx.lower_triangular_tag, lx.unit_diagonal_tag)
    wide = lx.MatrixLinearOperator(upper_part, unit_lower)
    padding = lx.IdentityLinearOperator(_S3, _S5)
    tall_unit = lx.MatrixLinearOperator(
        jnp.tril(jnp.ones((5, 3)), -1) + jnp.eye(5, 3), unit_lower
    )
    b = jnp.arange(1.0, 6.0)
    for product in (padding @ wide, tall_unit @ wide):
        assert lx.is_lower_triangular(product)
        assert not lx.has_unit_diagonal(product)
        sol = lx.linear_solve(product, b, throw=False)
        assert sol.result != lx.RESULTS.successful
    # Where the inner size covers the diagonal the claim stays: `eye(3, 5) @
    # eye(5, 3)` is `eye(3)`, and a square product of unit triangular factors
    # keeps its unit diagonal.
    assert lx.has_unit_diagonal(padding.T @ padding)
    assert lx.has_unit_diagonal(wide @ tall_unit)
    square = lx.MatrixLinearOperator(jnp.tril(jnp.ones((3, 3))), unit_lower)
    assert lx.has_unit_diagonal(square @ square)


def test_bands_of_a_real_plus_complex_sum():
    # `A + B * 1j` with `A`, `B` real is complex (documented in
    # `lx.AddLinearOperator`), but its `lx.diagonal` and `lx.tridiagonal` added
    # the parts' real and complex bands implicitly: a `TypePromotionError` from
    # JAX under strict dtype promotion (as this suite runs), also from every
    # solve that reads them (`Auto` on a sum of diagonal operators).
    matrix = np.array([[2.0, 1.0], [0.5, 3.0]])
    a = lx.MatrixLinearOperator(jnp.asarray(matrix))
    total = a + lx.MatrixLinearOperator(jnp.asarray(matrix.T)) * 1j
    ref = matrix + 1j * matrix.T
    np.testing.assert_allclose(lx.diagonal(total), np.diagonal(ref))
    bands = lx.tridiagonal(total)
    for band, k in zip(bands, (0, -1, 1)):
        np.testing.assert_allclose(band, np.diagonal(ref, k))
    d = np.array([1.0, 2.0])
    diag = lx.DiagonalLinearOperator(jnp.asarray(d))
    total = diag + diag * 1j
    b = jnp.array([1.0 + 0j, 2.0])
    x = jax.jit(lambda op, b: lx.linear_solve(op, b).value)(total, b)
    np.testing.assert_allclose(x, np.asarray(b) / (d + 1j * d))


def test_scaled_stacked_block_diagonal_through_jit():
    # Alike blocks are stored stacked, and `2.0 * blockdiag` scales the stack,
    # holding the Python number 2.0 as a PyTree leaf of it. `jax.jit` traced that
    # leaf as a 0-d array, with none of the stack's leading axis: solving,
    # `mv` and `as_matrix` of the jitted operator failed with an `IndexError`
    # (or a `vmap` rank error) from inside JAX.
    a = np.array([[2.0, 1.0], [0.5, 3.0]])
    blocks = [lx.MatrixLinearOperator(jnp.asarray(m)) for m in (a, a.T)]
    blockdiag = lx.BlockDiagonalLinearOperator(blocks)
    assert blockdiag.stacked is not None
    b = (jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0]))
    solve = jax.jit(lambda op, b: lx.linear_solve(op, b).value)
    for op, scale in ((2.0 * blockdiag, 2.0), (blockdiag / 4.0, 0.25)):
        x = solve(op, b)
        np.testing.assert_allclose(x[0], np.linalg.solve(scale * a, b[0]))
        np.testing.assert_allclose(x[1], np.linalg.solve(scale * a.T, b[1]))
        matrix = jax.jit(lambda op: op.as_matrix())(op)
        np.testing.assert_allclose(matrix[2:, 2:], scale * a.T)


def test_diagonal_of_rectangular_tagged_matrix_free_operators():
    # `lx.diagonal` is documented for any operator (length `min(out, in)`), and
    # the rectangular identity is diagonal; a matrix-free operator tagged
    # diagonal or tridiagonal that is rectangular raised "`diagonal` needs a
    # square operator" (probing, which assumed a square operator).
    diag = np.eye(5, 3) * np.arange(1.0, 4.0)
    bands = diag + np.eye(5, 3, k=-1) + 2 * np.eye(5, 3, k=1)
    for matrix, tag in ((diag, lx.diagonal_tag), (bands, lx.tridiagonal_tag)):
        for m in (matrix, matrix.T):
            op = lx.FunctionLinearOperator(
                lambda x, m=jnp.asarray(m): m @ x,
                jax.ShapeDtypeStruct((m.shape[1],), jnp.float64),
                tag,
            )
            for operator, scale in (
                (op, 1.0),
                (lx.TaggedLinearOperator(op, tag), 1.0),
                (2.0 * op, 2.0),
            ):
                expected = scale * np.diagonal(m)
                np.testing.assert_allclose(lx.diagonal(operator), expected)


#
# A small sample of the generator: trees over 1-D vectors of size 4, each built
# with the dense matrix it stands for.
#

_N = 4
_STRUCT = jax.ShapeDtypeStruct((_N,), jnp.float64)
_TAGS = {
    "symmetric": lx.symmetric_tag,
    "diagonal": lx.diagonal_tag,
    "tridiagonal": lx.tridiagonal_tag,
    "lower": lx.lower_triangular_tag,
    "upper": lx.upper_triangular_tag,
    "psd": lx.positive_semidefinite_tag,
    "nsd": lx.negative_semidefinite_tag,
    "unit": lx.unit_diagonal_tag,
}


def _properties(m):
    tol = 1e-9 * max(1.0, np.abs(m).max())
    i, j = np.indices(m.shape)
    zero = lambda mask: bool(np.all(np.abs(m[mask]) <= tol))  # noqa: E731
    hermitian = np.allclose(m, m.conj().T, atol=tol, rtol=0)
    eig = np.linalg.eigvalsh((m + m.conj().T) / 2)
    return {
        "symmetric": np.allclose(m, m.T, atol=tol, rtol=0),
        "hermitian": hermitian,
        "diagonal": zero(i != j),
        "tridiagonal": zero(abs(i - j) > 1),
        "lower": zero(j > i),
        "upper": zero(j < i),
        "psd": hermitian and eig.min() >= -10 * tol,
        "nsd": hermitian and eig.max() <= 10 * tol,
        "unit": np.allclose(np.diagonal(m), 1, atol=tol, rtol=0),
    }


def _random_matrix(rng, kind):
    a = rng.standard_normal((_N, _N))
    eye = np.eye(_N)
    return {
        "general": a + 4 * eye,
        "psd": a @ a.T + eye,
        "nsd": -(a @ a.T + eye),
        "symmetric": a + a.T,
        "diagonal": np.diag(np.diag(a) + 3),
        "tridiagonal": np.triu(np.tril(a, 1), -1) + 4 * eye,
        "lower": np.tril(a) + 4 * eye,
        "upper": np.triu(a) + 4 * eye,
        "unit": np.tril(a, -1) + eye,
    }[kind]


def _random_leaf(rng):
    kinds = ["general", "psd", "nsd", "symmetric", "diagonal"]
    kinds += ["tridiagonal", "lower", "upper", "unit"]
    m = _random_matrix(rng, kinds[rng.integers(len(kinds))])
    true = [name for name, holds in _properties(m).items() if holds and name in _TAGS]
    tags = [_TAGS[t] for t in true if rng.random() < 0.5]
    a = jnp.asarray(m)
    which = rng.integers(4)
    if which == 0:
        return lx.MatrixLinearOperator(a, tags), m
    if which == 1:
        return lx.FunctionLinearOperator(lambda x: a @ x, _STRUCT, tags), m
    if which == 2:
        return lx.JacobianLinearOperator(
            lambda x, _: a @ x, jnp.zeros(_N), None, tags
        ), m
    b = rng.standard_normal((2, 2))
    c = rng.standard_normal((2, 2)) + 3 * np.eye(2)
    return (
        lx.KroneckerLinearOperator(
            lx.MatrixLinearOperator(jnp.asarray(b)),
            lx.MatrixLinearOperator(jnp.asarray(c)),
        ),
        np.kron(b, c),
    )


def _random_tree(rng, depth):
    if depth == 0 or rng.random() < 0.25:
        return _random_leaf(rng)
    node = rng.integers(9)
    a, m = _random_tree(rng, depth - 1)
    if node == 0:
        b, n = _random_tree(rng, depth - 1)
        return a + b, m + n
    if node == 1:
        b, n = _random_tree(rng, depth - 1)
        return a @ b, m @ n
    if node == 2:
        b, n = _random_tree(rng, depth - 1)
        return a - b, m - n
    if node == 3:
        return -a, -m
    if node == 4:
        s = float(rng.choice([-2.0, -0.5, 0.5, 3.0]))
        return (a * s, m * s) if rng.random() < 0.5 else (a / s, m / s)
    if node == 5:
        return a.T, m.T
    if node == 6:
        return lx.conj(a), m
    if node == 7:
        tags = [_TAGS[t] for t, h in _properties(m).items() if h and t in _TAGS]
        return lx.TaggedLinearOperator(a, tags), m
    return lx.materialise(a), m


@eqx.filter_jit
def _auto_solve(operator, b):
    sol = lx.linear_solve(
        operator, b, lx.AutoLinearSolver(well_posed=True), throw=False
    )
    return sol.value, sol.result


def test_random_trees():
    rng = np.random.default_rng(20261128)
    for _ in range(12):
        operator, m = _random_tree(rng, 3)
        properties = _properties(m)
        for name, predicate in PREDICATES.items():
            # (A complex Hermitian operator tagged definite is symmetric by the
            # tag's documented meaning.)
            if predicate(operator) and not properties[name]:
                assert name == "symmetric" and properties["hermitian"], name
        x = rng.standard_normal(_N)
        np.testing.assert_allclose(operator.mv(jnp.asarray(x)), m @ x, atol=1e-9)
        np.testing.assert_allclose(operator.as_matrix(), m, atol=1e-9)
        np.testing.assert_allclose(operator.T.as_matrix(), m.T, atol=1e-9)
        np.testing.assert_allclose(lx.diagonal(operator), np.diagonal(m), atol=1e-9)
        if np.linalg.cond(m) < 1e6:
            b = jnp.asarray(rng.standard_normal(_N)).astype(m.dtype)
            value, result = _auto_solve(operator, b)
            assert result == lx.RESULTS.successful
            np.testing.assert_allclose(value, np.linalg.solve(m, b), rtol=1e-6)
