"""Adversarial review of tags, the structure predicates and `AutoLinearSolver`'s
choice, against the published lineax 0.1.1 (run as an oracle in a subprocess while
reviewing; what it answered is hard-coded here) and NumPy float64.

Reviewed and found to agree with 0.1.1 (or to differ only where this library is
documented to do better):

- `AutoLinearSolver(well_posed=True/None/False).select_solver` for Matrix,
  PyTree, Function, Jacobian, Tagged, Diagonal, Tridiagonal, Identity (square,
  reshaping, rectangular), Add, Mul, Div, Neg, Composed, `.T`, `materialise`,
  `linearise` and `conj` operators, under every single tag and the usual pairs.
  Deliberate differences: positive/negative scalings of a definite operator (`2 *
  op`, `op / -2`, `-op`) stay definite, so Cholesky is picked (0.1.1: LU, as it
  converts the scalar to an array); the diagonal tag implies the triangular and
  tridiagonal ones; the rectangular identity gets SVD from `well_posed=False`
  (0.1.1 picks `Diagonal`, which returns a vector of the wrong size).
- Singular inputs under each choice report `singular` rather than a wrong
  `successful` answer: Cholesky of singular (rank-deficient, zero) positive
  semidefinite matrices, triangular matrices with a zero on the diagonal,
  tridiagonal ones with a zero pivot, `Diagonal(well_posed=True)` of a zero entry.
  Tags that do not hold (unit diagonal not stored as ones, ...) solve the tagged
  problem, as `docs/failures.md` documents.
- Tags given as one tag, a list, a tuple, a set, a frozenset or with duplicates
  mean the same; strings are refused naming the real tags (0.1.1 accepted and
  ignored them). `tags=None` and unknown objects are kept as (user) tags, as in
  0.1.1.

Defects found and fixed (the tests below fail before the fix):

- A 1x1 `TridiagonalLinearOperator`, a `(1, k) @ (k, 1)` composition and a 1x1
  user operator registering no predicates were not diagonal, so
  `AutoLinearSolver(well_posed=None)` picked `Tridiagonal` or `LU` and reported
  a zero entry as singular (the API contract: the pseudoinverse, 0; 0.1.1 too,
  for the tridiagonal one).
- Symmetric / positive / negative semidefinite tags on a tall or wide operator
  were accepted silently (0.1.1 raised a ValueError), and a rectangular operator
  tagged diagonal, or a rectangular identity composed with a diagonal, was
  reported symmetric.
- A nested collection of tags (`[(lower, unit)]`) was kept as one unknown tag,
  silently leaving the operator without structure (0.1.1 too); a nested list or
  set failed with Python's bare "unhashable type". Both are now TypeErrors
  naming `tags`.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import diag, lower, nsd, psd, sym, tri, unit, upper, UserMatrixOperator
from jaxtyping import Array, Float

import lineax as lx


f64 = jnp.float64


def _solver_name(operator: lx.AbstractLinearOperator, well_posed) -> str:
    solver = lx.AutoLinearSolver(well_posed=well_posed).select_solver(operator)
    name = type(solver).__name__
    if isinstance(solver, lx.Diagonal):
        name += f"({solver.well_posed})"
    return name


def _tridiagonal_1x1(value: float) -> lx.TridiagonalLinearOperator:
    return lx.TridiagonalLinearOperator(
        jnp.array([value], f64), jnp.zeros(0, f64), jnp.zeros(0, f64)
    )


#
# 1x1 operators are diagonal.
#


# (A user's operator class that registers none of the predicates.)
_UserOperator = UserMatrixOperator


@pytest.mark.parametrize(
    "make",
    [
        lambda v: _tridiagonal_1x1(v),
        lambda v: _tridiagonal_1x1(v) @ _tridiagonal_1x1(1.0),
        lambda v: 2.0 * _tridiagonal_1x1(v),
        lambda v: (
            lx.MatrixLinearOperator(jnp.array([[v, 1.0]], f64))
            @ lx.MatrixLinearOperator(jnp.array([[1.0], [0.0]], f64))
        ),
        lambda v: _UserOperator(jnp.array([[v]], f64)),
    ],
    ids=["tridiagonal", "composed", "scaled", "wide @ tall", "user operator"],
)
def test_one_by_one_operator_gets_the_pseudoinverse(make):
    # The API contract: `AutoLinearSolver(well_posed=None)` gives every 1x1
    # operator the pseudoinverse, 0 for a zero entry. 0.1.1 did for the first
    # three (Diagonal(True) / Diagonal(False) / Diagonal(False)); this library
    # picked Tridiagonal or LU and returned inf or NaN with `singular` for all
    # five (0.1.1 also fails the last two: LU, and NotImplementedError).
    operator = make(0.0)
    assert lx.is_diagonal(operator)
    assert _solver_name(operator, True) == "Diagonal(True)"
    assert _solver_name(operator, None) == "Diagonal(False)"
    assert _solver_name(operator, False) == "Diagonal(False)"
    sol = lx.linear_solve(
        operator, jnp.ones(1, f64), lx.AutoLinearSolver(well_posed=None), throw=False
    )
    assert sol.result == lx.RESULTS.successful
    np.testing.assert_array_equal(np.asarray(sol.value), [0.0])
    # A nonzero entry is solved exactly.
    operator = make(4.0)
    sol = lx.linear_solve(operator, jnp.array([2.0], f64))
    np.testing.assert_allclose(np.asarray(sol.value), 2.0 / operator.as_matrix()[0])


def test_larger_tridiagonal_operator_is_not_diagonal():
    operator = lx.TridiagonalLinearOperator(
        jnp.ones(2, f64), jnp.zeros(1, f64), jnp.zeros(1, f64)
    )
    assert not lx.is_diagonal(operator)
    assert _solver_name(operator, None) == "Tridiagonal"


#
# Tags that need a square operator.
#


def _tall_operators(tags) -> dict[str, Callable[[], lx.AbstractLinearOperator]]:
    matrix = jnp.arange(6.0, dtype=f64).reshape(3, 2)
    s2 = jax.ShapeDtypeStruct((2,), f64)
    return {
        "matrix": lambda: lx.MatrixLinearOperator(matrix, tags),
        "wide matrix": lambda: lx.MatrixLinearOperator(matrix.T, tags),
        "pytree": lambda: lx.PyTreeLinearOperator(
            matrix, jax.ShapeDtypeStruct((3,), f64), tags
        ),
        "function": lambda: lx.FunctionLinearOperator(lambda x: matrix @ x, s2, tags),
        "jacobian": lambda: lx.JacobianLinearOperator(
            lambda x, _: matrix @ jnp.sin(x), jnp.zeros(2, f64), None, tags
        ),
        "tagged": lambda: lx.TaggedLinearOperator(
            lx.MatrixLinearOperator(matrix), tags
        ),
        "tagged identity": lambda: lx.TaggedLinearOperator(
            lx.IdentityLinearOperator(s2, jax.ShapeDtypeStruct((3,), f64)), tags
        ),
    }


_SQUARE_ONLY = {
    "symmetric": (sym, "symmetric_tag"),
    "psd": (psd, "positive_semidefinite_tag"),
    "nsd": ([nsd], "negative_semidefinite_tag"),
    "diagonal and psd": ((diag, psd), "positive_semidefinite_tag"),
}


@pytest.mark.parametrize("tag", list(_SQUARE_ONLY))
@pytest.mark.parametrize("kind", list(_tall_operators(())))
def test_square_only_tag_on_rectangular_operator_is_refused(kind, tag):
    # 0.1.1: "ValueError: Symmetric/Hermitian matrices must have matching input and
    # output structures"; this library accepted the tag silently.
    tags, name = _SQUARE_ONLY[tag]
    with pytest.raises(ValueError, match=f"`tags` holds `lx.{name}`.*square"):
        _tall_operators(tags)[kind]()


@pytest.mark.parametrize("tag", ["symmetric", "psd"])
def test_square_only_tag_refused_after_a_square_matrix_with_the_tag(tag):
    # `MatrixLinearOperator(A, tags)` of a concrete array is built from a PyTree
    # structure cached per `tags` argument, skipping `__init__`'s checks: a square
    # matrix with the tag built first let a rectangular one with the same tags
    # through (found in the full test run, where other tests had built one).
    tags, name = _SQUARE_ONLY[tag]
    for _ in range(2):  # the first fills the cache
        lx.MatrixLinearOperator(jnp.eye(3), tags)
    with pytest.raises(ValueError, match=f"`tags` holds `lx.{name}`.*square"):
        lx.MatrixLinearOperator(jnp.ones((3, 2)), tags)


@pytest.mark.parametrize("kind", list(_tall_operators(())))
def test_rectangular_diagonal_tag_is_accepted_but_not_symmetric(kind):
    # A rectangular diagonal (as the rectangular identity is) is allowed, and
    # is diagonal and triangular but not symmetric, although the diagonal tag
    # implies the symmetric one for square operators.
    operator = _tall_operators((diag, unit))[kind]()
    assert lx.is_diagonal(operator)
    assert lx.is_lower_triangular(operator) and lx.is_upper_triangular(operator)
    assert lx.has_unit_diagonal(operator)
    assert not lx.is_symmetric(operator)
    assert not lx.is_positive_semidefinite(operator)
    assert not lx.is_symmetric(operator.T)
    assert _solver_name(operator, None) == "QR"
    assert _solver_name(operator, False) == "SVD"


_S2 = jax.ShapeDtypeStruct((2,), f64)
_RECTANGULAR_DIAGONALS = {
    "identity": lambda: lx.IdentityLinearOperator(_S2, jax.ShapeDtypeStruct((3,), f64)),
    "tagged matrix": lambda: lx.MatrixLinearOperator(jnp.eye(3, 2, dtype=f64), diag),
    "tagged function": lambda: lx.FunctionLinearOperator(
        lambda x: jnp.concatenate([x, jnp.zeros(1, f64)]), _S2, diag
    ),
}


@pytest.mark.parametrize("kind", list(_RECTANGULAR_DIAGONALS))
def test_rectangular_diagonal_composed_with_diagonal_is_not_symmetric(kind):
    # `I @ D` with `I` the 3x2 identity is 3x2 and diagonal; it was reported
    # symmetric (as were its scalings, sums, negation and transpose).
    composed = _RECTANGULAR_DIAGONALS[kind]() @ lx.DiagonalLinearOperator(
        jnp.array([1.0, 2.0], f64)
    )
    for operator in (composed, composed.T, 2.0 * composed, -composed, composed / 2):
        assert lx.is_diagonal(operator)
        assert not lx.is_symmetric(operator)
        assert not lx.is_symmetric(lx.conj(operator))
    np.testing.assert_array_equal(np.asarray(lx.diagonal(composed)), [1.0, 2.0])


def test_square_only_tags_on_equal_sizes_of_different_shapes_are_accepted():
    # A map between two structures of one size, (2, 2) -> (4,), is square: its
    # matrix may be symmetric (this library's documented choice; 0.1.1 demanded
    # equal structures).
    s22 = jax.ShapeDtypeStruct((2, 2), f64)
    operator = lx.FunctionLinearOperator(lambda x: 2.0 * x.reshape(4), s22, psd)
    assert lx.is_symmetric(operator) and lx.is_positive_semidefinite(operator)
    assert _solver_name(operator, True) == "Cholesky"


#
# Tags given in different forms mean the same.
#


@pytest.mark.parametrize(
    "tags",
    [
        [lower, unit],
        (lower, unit),
        (lower, unit, lower),
        {lower, unit},
        frozenset({lower, unit}),
        iter([lower, unit]),
    ],
    ids=["list", "tuple", "duplicates", "set", "frozenset", "iterator"],
)
def test_tags_in_any_iterable_form(tags):
    operator = lx.MatrixLinearOperator(jnp.eye(3, dtype=f64), tags)
    assert operator.tags == frozenset({lower, unit})
    assert _solver_name(operator, True) == "Triangular"
    transposed = operator.T
    assert isinstance(transposed, lx.MatrixLinearOperator)
    assert transposed.tags == frozenset({upper, unit})


@pytest.mark.parametrize("tags", ["symmetric", ["lower_triangular", unit], b"psd"])
def test_string_tags_are_refused(tags):
    with pytest.raises(TypeError, match="`tags` must hold tag objects"):
        lx.MatrixLinearOperator(jnp.eye(3, dtype=f64), tags)


@pytest.mark.parametrize(
    "tags",
    [
        [(lower, unit)],
        ((lower,), unit),
        [frozenset({sym})],
        frozenset({(psd, sym)}),
    ],
    ids=["tuple in list", "tuple in tuple", "frozenset in list", "in frozenset"],
)
def test_nested_tags_are_refused(tags):
    # 0.1.1 and this library kept the inner collection as one unknown tag: the
    # operator silently had no structure (LU instead of Triangular, and CG refused
    # it as untagged).
    with pytest.raises(TypeError, match="`tags` must be a flat iterable of tags"):
        lx.MatrixLinearOperator(jnp.eye(3, dtype=f64), tags)
    with pytest.raises(TypeError, match="`tags` must be a flat iterable of tags"):
        lx.TaggedLinearOperator(lx.MatrixLinearOperator(jnp.eye(3, dtype=f64)), tags)


@pytest.mark.parametrize(
    "tags",
    [[[lower, unit]], [{sym}], jnp.ones(2)],
    ids=["list in list", "set in list", "array"],
)
def test_unhashable_tags_name_the_argument(tags):
    # Was Python's bare "unhashable type: 'list'".
    with pytest.raises(TypeError, match="`tags` must be one tag or a flat iterable"):
        lx.MatrixLinearOperator(jnp.eye(3, dtype=f64), tags)


def test_user_tags_may_be_tuples():
    # A user's own tag may be any hashable object, a tuple of other things too.
    mine = ("my", "tag")
    operator = lx.MatrixLinearOperator(jnp.eye(3, dtype=f64), [mine, lower])
    assert operator.tags == frozenset({mine, lower})
    assert _solver_name(operator, True) == "Triangular"


#
# `AutoLinearSolver`'s choice against 0.1.1, and its solves against NumPy.
#


def _spd(n: int) -> Float[np.ndarray, "n n"]:
    a = np.random.default_rng(n).standard_normal((n, n))
    return a @ a.T + n * np.eye(n)


_S3 = jax.ShapeDtypeStruct((3,), f64)
_A = np.array([[4.0, 1.0, 0.0], [2.0, 5.0, 1.0], [0.5, 3.0, 6.0]])

# (operator thunk, 0.1.1's choices for well_posed True, None, False, and this
# library's where it deliberately differs.)
CHOICES = {
    "matrix": (lambda: lx.MatrixLinearOperator(_A), "LU LU SVD"),
    "symmetric": (
        lambda: lx.MatrixLinearOperator(_spd(3), sym),
        "LU LU SVD",
    ),
    "psd": (lambda: lx.MatrixLinearOperator(_spd(3), psd), "Cholesky Cholesky SVD"),
    "nsd": (
        lambda: lx.MatrixLinearOperator(-_spd(3), nsd),
        "Cholesky Cholesky SVD",
    ),
    "lower": (
        lambda: lx.MatrixLinearOperator(np.tril(_A), lower),
        "Triangular Triangular SVD",
    ),
    "upper unit": (
        lambda: lx.MatrixLinearOperator(np.triu(_A, 1) + np.eye(3), (upper, unit)),
        "Triangular Triangular SVD",
    ),
    "tridiagonal tag": (
        lambda: lx.MatrixLinearOperator(np.triu(np.tril(_A, 1), -1), tri),
        "Tridiagonal Tridiagonal SVD",
    ),
    "diagonal tag": (
        lambda: lx.MatrixLinearOperator(np.diag(np.diag(_A)), diag),
        "Diagonal(True) Diagonal(False) Diagonal(False)",
    ),
    "psd and tridiagonal": (
        lambda: lx.MatrixLinearOperator(np.triu(np.tril(_spd(3), 1), -1), (psd, tri)),
        "Tridiagonal Tridiagonal SVD",
    ),
    "lower and psd": (
        lambda: lx.MatrixLinearOperator(np.diag(np.diag(_spd(3))), (lower, psd)),
        "Triangular Triangular SVD",
    ),
    "1x1 untagged": (
        lambda: lx.MatrixLinearOperator(np.array([[3.0]])),
        "Diagonal(True) Diagonal(False) Diagonal(False)",
    ),
    "tall": (
        lambda: lx.MatrixLinearOperator(_A[:, :2]),
        "ValueError QR SVD",
    ),
    "wide lower": (
        lambda: lx.MatrixLinearOperator(np.tril(_A[:2]), lower),
        "ValueError QR SVD",
    ),
    "DiagonalLinearOperator": (
        lambda: lx.DiagonalLinearOperator(jnp.arange(1.0, 4.0, dtype=f64)),
        "Diagonal(True) Diagonal(False) Diagonal(False)",
    ),
    "TridiagonalLinearOperator": (
        lambda: lx.TridiagonalLinearOperator(
            jnp.arange(4.0, 7.0, dtype=f64), jnp.ones(2, f64), jnp.ones(2, f64)
        ),
        "Tridiagonal Tridiagonal SVD",
    ),
    "identity": (
        lambda: lx.IdentityLinearOperator(_S3),
        "Diagonal(True) Diagonal(False) Diagonal(False)",
    ),
    "function psd": (
        lambda: lx.FunctionLinearOperator(lambda x: jnp.asarray(_spd(3)) @ x, _S3, psd),
        "Cholesky Cholesky SVD",
    ),
    "jacobian upper": (
        lambda: lx.JacobianLinearOperator(
            lambda x, _: jnp.asarray(np.triu(_A)) @ x, jnp.ones(3, f64), None, upper
        ),
        "Triangular Triangular SVD",
    ),
    "pytree diagonal": (
        lambda: lx.PyTreeLinearOperator(np.diag([1.0, 2.0, 3.0]), _S3, diag),
        "Diagonal(True) Diagonal(False) Diagonal(False)",
    ),
    "tagged lower": (
        lambda: lx.TaggedLinearOperator(lx.MatrixLinearOperator(np.tril(_A)), lower),
        "Triangular Triangular SVD",
    ),
    "transposed lower": (
        lambda: lx.MatrixLinearOperator(np.tril(_A), lower).T,
        "Triangular Triangular SVD",
    ),
    "psd + psd": (
        lambda: (
            lx.MatrixLinearOperator(_spd(3), psd)
            + lx.MatrixLinearOperator(_spd(4)[:3, :3], psd)
        ),
        "Cholesky Cholesky SVD",
    ),
    "identity + psd": (
        lambda: lx.IdentityLinearOperator(_S3) + lx.MatrixLinearOperator(_spd(3), psd),
        "Cholesky Cholesky SVD",
    ),
    "psd - psd": (
        lambda: (
            lx.MatrixLinearOperator(_spd(3), psd)
            - lx.MatrixLinearOperator(np.eye(3), psd)
        ),
        "LU LU SVD",
    ),
    "psd + nsd": (
        lambda: (
            lx.MatrixLinearOperator(_spd(3), psd)
            + lx.MatrixLinearOperator(-np.eye(3), nsd)
        ),
        "LU LU SVD",
    ),
    "-psd": (lambda: -lx.MatrixLinearOperator(_spd(3), psd), "Cholesky Cholesky SVD"),
    # 0.1.1: LU (the scalar is an array there, of unknown sign).
    "2 * psd": (
        lambda: 2.0 * lx.MatrixLinearOperator(_spd(3), psd),
        "LU LU SVD",
        "Cholesky Cholesky SVD",
    ),
    "psd / -2": (
        lambda: lx.MatrixLinearOperator(_spd(3), psd) / -2.0,
        "LU LU SVD",
        "Cholesky Cholesky SVD",
    ),
    "psd * array": (
        lambda: lx.MatrixLinearOperator(_spd(3), psd) * jnp.asarray(2.0, f64),
        "LU LU SVD",
    ),
    "lower @ lower": (
        lambda: (
            lx.MatrixLinearOperator(np.tril(_A), lower)
            @ lx.MatrixLinearOperator(np.tril(_A.T), lower)
        ),
        "Triangular Triangular SVD",
    ),
    "upper @ lower": (
        lambda: (
            lx.MatrixLinearOperator(np.triu(_A), upper)
            @ lx.MatrixLinearOperator(np.tril(_A), lower)
        ),
        "LU LU SVD",
    ),
    "psd @ psd": (
        lambda: (
            lx.MatrixLinearOperator(_spd(3), psd)
            @ lx.MatrixLinearOperator(_spd(3), psd)
        ),
        "LU LU SVD",
    ),
    "diagonal @ tridiagonal": (
        lambda: (
            lx.MatrixLinearOperator(np.diag([1.0, 2.0, 3.0]), diag)
            @ lx.MatrixLinearOperator(np.triu(np.tril(_A, 1), -1), tri)
        ),
        "Tridiagonal Tridiagonal SVD",
    ),
    # 0.1.1: LU (its diagonal tag does not imply the triangular ones).
    "diagonal + lower": (
        lambda: (
            lx.MatrixLinearOperator(np.diag([1.0, 2.0, 3.0]), diag)
            + lx.MatrixLinearOperator(np.tril(_A), lower)
        ),
        "LU LU SVD",
        "Triangular Triangular SVD",
    ),
    "materialised function lower": (
        lambda: lx.materialise(
            lx.FunctionLinearOperator(
                lambda x: jnp.asarray(np.tril(_A)) @ x, _S3, lower
            )
        ),
        "Triangular Triangular SVD",
    ),
    "linearised jacobian psd": (
        lambda: lx.linearise(
            lx.JacobianLinearOperator(
                lambda x, _: jnp.asarray(_spd(3)) @ x, jnp.ones(3, f64), None, psd
            )
        ),
        "Cholesky Cholesky SVD",
    ),
}


def _choices(operator: lx.AbstractLinearOperator) -> str:
    out = []
    for well_posed in (True, None, False):
        try:
            out.append(_solver_name(operator, well_posed))
        except ValueError:
            out.append("ValueError")
    return " ".join(out)


@pytest.mark.parametrize("name", list(CHOICES))
def test_auto_choice_matches_published(name):
    make, published, *ours = CHOICES[name]
    assert _choices(make()) == (ours[0] if ours else published)


@eqx.filter_jit
def _solve_all(operator: lx.AbstractLinearOperator, b: Float[Array, " m"]):
    # One compiled program per operator type and shape, for the three choices.
    return tuple(
        lx.linear_solve(
            operator, b, lx.AutoLinearSolver(well_posed=well_posed), throw=False
        )
        for well_posed in (True, None, False)
    )


# Solved in the default run: one of each solver and operator kind (the solves
# compile, the choices above do not); the others with LINEAX_EXHAUSTIVE=1.
_SOLVED_BY_DEFAULT = (
    "psd",
    "nsd",
    "upper unit",
    "tridiagonal tag",
    "diagonal tag",
    "wide lower",
    "2 * psd",
    "psd / -2",
    "diagonal + lower",
)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            name, marks=() if name in _SOLVED_BY_DEFAULT else pytest.mark.exhaustive
        )
        for name in CHOICES
    ],
)
def test_auto_solves_match_numpy(name):
    # Every operator above is nonsingular and carries only tags that hold: each
    # choice solves it (least squares when tall, minimum norm when wide).
    operator = CHOICES[name][0]()
    matrix = np.asarray(operator.as_matrix())
    b = np.random.default_rng(0).standard_normal(matrix.shape[0])
    expected = np.linalg.pinv(matrix) @ b
    if operator.in_size() != operator.out_size():
        sols = [
            lx.linear_solve(operator, jnp.asarray(b), lx.AutoLinearSolver(well_posed=w))
            for w in (None, False)
        ]
    else:
        sols = _solve_all(operator, jnp.asarray(b))
    for sol in sols:
        assert sol.result == lx.RESULTS.successful
        np.testing.assert_allclose(
            np.asarray(sol.value), expected, rtol=1e-10, atol=1e-12
        )
