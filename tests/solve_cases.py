"""The table of solver cases shared by the solve, JVP, vmap and transpose tests.

A case is a solver, the kind of matrix it accepts (shape and structure), and the
tags that structure needs. Operators are made from a dense reference matrix in
several representations (matrix, PyTree, matrix-free function, Jacobian), so one
float64 NumPy reference (`np.linalg.pinv`) checks them all.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from beartype import beartype
from jaxtyping import Array, Inexact, jaxtyped

import lineax as lx


@dataclasses.dataclass(frozen=True)
class SolverCase:
    name: str
    solver: lx.AbstractLinearSolver
    matrix_kind: str  # see `make_matrix`
    tags: tuple = ()
    # Whether the case supports matrix-free operators (some solvers need tags that
    # materialise, which all kinds support; this is for e.g. exact-zero patterns).
    kinds: tuple = ("matrix", "pytree", "function", "jacobian", "native", "composed")


# Sizes are small: these tests check correctness, and compile time is per shape.
SHAPES = {
    "square": (5, 5),
    "tall": (7, 4),
    "wide": (4, 7),
    "rank_deficient": (6, 5),
    "rank_deficient_square": (5, 5),
    "spd": (5, 5),
    "nsd": (5, 5),
    "diagonal": (5, 5),
    "diagonal_singular": (5, 5),
    "lower": (5, 5),
    "upper": (5, 5),
    "unit_lower": (5, 5),
    "tridiagonal": (6, 6),
}


@jaxtyped(typechecker=beartype)
def make_matrix(kind: str, dtype: Any, seed: int = 0) -> np.ndarray:
    """A reference matrix (NumPy, float64 or complex128) of the given kind, rounded
    to `dtype` so that the reference solves the same problem as lineax."""
    rng = np.random.default_rng(seed)
    m, n = SHAPES[kind]
    complex_ = jnp.issubdtype(dtype, jnp.complexfloating)

    def randn(*shape):
        x = rng.standard_normal(shape)
        if complex_:
            x = x + 1j * rng.standard_normal(shape)
        return x

    if kind in ("square", "tall", "wide"):
        a = randn(m, n)
        k = min(m, n)
        a[:k, :k] += 3 * np.eye(k)  # keep it well conditioned
    elif kind == "rank_deficient":
        a = randn(m, 2) @ randn(2, n)
    elif kind == "rank_deficient_square":
        a = randn(m, 3) @ randn(3, n)
    elif kind in ("spd", "nsd"):
        b = randn(n, n)
        a = b @ b.conj().T + n * np.eye(n)
        if kind == "nsd":
            a = -a
    elif kind == "diagonal":
        a = np.diag(randn(n) + 3 * np.sign(rng.standard_normal(n)))
    elif kind == "diagonal_singular":
        d = randn(n) + 3
        d[1] = 0
        a = np.diag(d)
    elif kind in ("lower", "upper", "unit_lower"):
        a = np.tril(randn(n, n)) + 4 * np.eye(n)
        if kind == "unit_lower":
            a = a - np.diag(np.diag(a)) + np.eye(n)
        if kind == "upper":
            a = a.T
    elif kind == "tridiagonal":
        a = np.diag(randn(n) + 5) + np.diag(randn(n - 1), -1) + np.diag(randn(n - 1), 1)
    else:
        raise ValueError(kind)
    return np.asarray(np.asarray(a, dtype), np.complex128 if complex_ else np.float64)


def _split_structure(size: int, dtype: Any, variant: int) -> Any:
    """A PyTree structure of total size `size` with leaves of ranks 0 to 2."""
    assert size >= 4
    if variant == 0:
        return {
            "a": jax.ShapeDtypeStruct((), dtype),
            "b": jax.ShapeDtypeStruct((size - 1,), dtype),
        }
    return (
        jax.ShapeDtypeStruct((2, 1), dtype),
        jax.ShapeDtypeStruct((size - 2,), dtype),
    )


def flatten(tree: Any) -> Array:
    return jnp.concatenate([jnp.reshape(x, -1) for x in jtu.tree_leaves(tree)])


def unflatten(flat: Any, structure: Any) -> Any:
    leaves, treedef = jtu.tree_flatten(structure)
    out, i = [], 0
    for leaf in leaves:
        size = int(np.prod(leaf.shape))
        out.append(jnp.reshape(flat[i : i + size], leaf.shape).astype(leaf.dtype))
        i += size
    return jtu.tree_unflatten(treedef, out)


def make_operator(
    kind: str, matrix: Inexact[Array, "m n"], tags: tuple = ()
) -> lx.AbstractLinearOperator:
    """Represent the dense `matrix` as an operator of the given kind."""
    m, n = matrix.shape
    dtype = matrix.dtype
    if kind == "matrix":
        return lx.MatrixLinearOperator(matrix, tags)
    if kind == "pytree":
        in_struct = _split_structure(n, dtype, 0)
        out_struct = _split_structure(m, dtype, 1)
        in_leaves = jtu.tree_leaves(in_struct)
        out_leaves, out_def = jtu.tree_flatten(out_struct)
        blocks, r = [], 0
        for out_leaf in out_leaves:
            rows = int(np.prod(out_leaf.shape))
            row_blocks, c = [], 0
            for in_leaf in in_leaves:
                cols = int(np.prod(in_leaf.shape))
                block = matrix[r : r + rows, c : c + cols]
                row_blocks.append(block.reshape(out_leaf.shape + in_leaf.shape))
                c += cols
            blocks.append(jtu.tree_unflatten(jtu.tree_structure(in_struct), row_blocks))
            r += rows
        return lx.PyTreeLinearOperator(
            jtu.tree_unflatten(out_def, blocks), out_struct, tags
        )
    in_struct = jax.ShapeDtypeStruct((n,), dtype)
    if kind == "native":
        # The structured operator class for the matrix's structure, if any.
        if lx.diagonal_tag in tags:
            return lx.DiagonalLinearOperator(jnp.diagonal(matrix))
        if lx.tridiagonal_tag in tags:
            return lx.TridiagonalLinearOperator(
                jnp.diagonal(matrix), jnp.diagonal(matrix, -1), jnp.diagonal(matrix, 1)
            )
        return lx.MatrixLinearOperator(matrix, tags)
    if kind == "composed":
        # (M / 2) @ (2 I), tagged: exercises arithmetic and composition.
        half = lx.MatrixLinearOperator(matrix) / 2.0
        double = lx.IdentityLinearOperator(in_struct) * jnp.asarray(2.0, dtype)
        return lx.TaggedLinearOperator(half @ double, tags)
    if kind == "function":
        return lx.FunctionLinearOperator(lambda x: matrix @ x, in_struct, tags)
    if kind == "jacobian":
        x0 = jnp.arange(n, dtype=dtype) / n

        def fn(x, args):
            # Nonlinear, with Jacobian `matrix` at `x0`.
            return args @ x + jnp.sum((x - x0) ** 2)

        return lx.JacobianLinearOperator(fn, x0, matrix, tags)
    raise ValueError(kind)


def make_vector(operator: lx.AbstractLinearOperator, seed: int = 1) -> Any:
    rng = np.random.default_rng(seed)

    def leaf(s):
        x = rng.standard_normal(s.shape)
        if jnp.issubdtype(s.dtype, jnp.complexfloating):
            x = x + 1j * rng.standard_normal(s.shape)
        return jnp.asarray(x, s.dtype)

    return jtu.tree_map(leaf, operator.out_structure())


def tolerance(dtype: Any) -> float:
    return {
        jnp.float32: 2e-4,
        jnp.complex64: 2e-4,
        jnp.float64: 1e-10,
        jnp.complex128: 1e-10,
    }[jnp.dtype(dtype).type]


psd = lx.positive_semidefinite_tag
nsd = lx.negative_semidefinite_tag

SOLVER_CASES = [
    SolverCase("lu", lx.LU(), "square"),
    SolverCase("qr_square", lx.QR(), "square"),
    SolverCase("qr_tall", lx.QR(), "tall"),
    SolverCase("qr_wide", lx.QR(), "wide"),
    SolverCase("svd_square", lx.SVD(), "square"),
    SolverCase("svd_tall", lx.SVD(), "tall"),
    SolverCase("svd_wide", lx.SVD(), "wide"),
    SolverCase("svd_rank_deficient", lx.SVD(), "rank_deficient"),
    SolverCase("svd_rank_deficient_square", lx.SVD(), "rank_deficient_square"),
    SolverCase("cholesky_pos", lx.Cholesky(), "spd", (psd,)),
    SolverCase("cholesky_neg", lx.Cholesky(), "nsd", (nsd,)),
    SolverCase(
        "diagonal", lx.Diagonal(well_posed=True), "diagonal", (lx.diagonal_tag,)
    ),
    SolverCase("diagonal_pinv", lx.Diagonal(), "diagonal_singular", (lx.diagonal_tag,)),
    SolverCase(
        "triangular_lower", lx.Triangular(), "lower", (lx.lower_triangular_tag,)
    ),
    SolverCase(
        "triangular_upper", lx.Triangular(), "upper", (lx.upper_triangular_tag,)
    ),
    SolverCase(
        "triangular_unit",
        lx.Triangular(),
        "unit_lower",
        (lx.lower_triangular_tag, lx.unit_diagonal_tag),
    ),
    SolverCase("tridiagonal", lx.Tridiagonal(), "tridiagonal", (lx.tridiagonal_tag,)),
    SolverCase("normal_cholesky_tall", lx.Normal(lx.Cholesky()), "tall"),
    SolverCase("normal_cholesky_wide", lx.Normal(lx.Cholesky()), "wide"),
    SolverCase("auto_true", lx.AutoLinearSolver(well_posed=True), "square"),
    SolverCase("auto_true_spd", lx.AutoLinearSolver(well_posed=True), "spd", (psd,)),
    SolverCase("auto_none_tall", lx.AutoLinearSolver(well_posed=None), "tall"),
    SolverCase("auto_false", lx.AutoLinearSolver(well_posed=False), "rank_deficient"),
]

CASES_BY_NAME = {case.name: case for case in SOLVER_CASES}


def pinv_solution(
    matrix: np.ndarray, vector: np.ndarray, dtype: Any = jnp.float64
) -> np.ndarray:
    """The pseudoinverse solution in float64, treating as zero the singular values
    that rounding to `dtype` may have created."""
    rcond = 10 * max(matrix.shape) * float(jnp.finfo(dtype).eps)
    return np.linalg.pinv(matrix, rcond=rcond) @ vector


Factory = Callable[..., Any]
