"""The shared test table: tolerances, flattening, random structures and vectors, the
operator factories, and the solver cases. Every test module takes its cases from
here.

Every factory turns a dense reference matrix into an operator of one kind, and
returns it together with the dense float64/complex128 NumPy matrix that operator
actually represents (in the flattened PyTree-leaf order of its input and output
structures). Tests then compare whatever the operator computes against NumPy.

    matrix = random_matrix(rng, 4, 4, jnp.float64, (lx.symmetric_tag,))
    op, ref = make_operator("pytree", matrix, jnp.float64, (lx.symmetric_tag,),
                            in_structure=..., out_structure=...)
    assert np.allclose(flatten(op.mv(vector)), ref @ flatten(vector))

For most kinds `ref` is `matrix` rounded to `dtype`; `diagonal`, `tridiagonal`
and `identity` can only represent part of it (see `PARTIAL_KINDS`). The factories
also accept a JAX array (even a tracer, to differentiate through the operator's
construction); `ref` is then `None`.

The solver cases (`SOLVER_CASES` for the direct solvers, `KRYLOV_CASES` for the
iterative ones) pair a solver with the kind of matrix it accepts (`make_matrix`),
and `case_operator` represents such a matrix in one of `CASE_KINDS`.
"""

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from beartype import beartype
from conftest import EXHAUSTIVE
from jax.experimental import sparse as jsparse
from jaxtyping import Array, Inexact, jaxtyped, PyTree, Shaped

import lineax as lx


Structure = PyTree[jax.ShapeDtypeStruct]
NumpyMatrix = Inexact[np.ndarray, "m n"]

# The JAX version whose program sizes, trace counts and bits some tests pin (the
# compile guard's, `compile_guard.json`): they are JAX's implementation, not
# lineax's behaviour, and are skipped with another JAX (the CI job on the newest
# supported JAX runs the rest).
RECORDED_JAX = json.loads(
    pathlib.Path(__file__).with_name("compile_guard.json").read_text()
)["jax_version"]
recorded_jax_only = pytest.mark.skipif(
    jax.__version__ != RECORDED_JAX,
    reason=f"pins JAX {RECORDED_JAX}'s programs or traces (JAX {jax.__version__})",
)

DTYPES = (jnp.float32, jnp.float64, jnp.complex128)

# Short names for the tags, for the tables of tag combinations.
sym = lx.symmetric_tag
diag = lx.diagonal_tag
tri = lx.tridiagonal_tag
lower = lx.lower_triangular_tag
upper = lx.upper_triangular_tag
unit = lx.unit_diagonal_tag
psd = lx.positive_semidefinite_tag
nsd = lx.negative_semidefinite_tag

#
# A fresh process.
#


class UserMatrixOperator(lx.AbstractLinearOperator):
    """A user's operator class around a matrix, as users write one (`mv`,
    `as_matrix`, `transpose` and the structures, from the matrix's shape and
    dtype), registering none of the predicates. Tests subclass it to register
    predicates for the subclass, or to break one of its methods."""

    matrix: Shaped[Array, "m n"]

    def mv(self, vector):
        return self.matrix @ vector

    def as_matrix(self):
        return self.matrix

    def transpose(self) -> lx.AbstractLinearOperator:
        return type(self)(self.matrix.T)

    def in_structure(self):
        return jax.ShapeDtypeStruct(self.matrix.shape[1:], self.matrix.dtype)

    def out_structure(self):
        return jax.ShapeDtypeStruct(self.matrix.shape[:1], self.matrix.dtype)


def run_python(
    code: str,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    python_args: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    """Run the Python `code` in a fresh process (`python [python_args] -c code`),
    with this test run's lineax (the source tree or an installed wheel) first on
    `PYTHONPATH` and `env` added to the environment; its output captured as text,
    its stdin empty (a debugger it opens does not wait), and killed after
    `timeout` seconds.

    For what a process reads once: configuration and environment flags read at
    import (`EQX_ON_ERROR`, `XLA_FLAGS`), process-global JAX flags, hangs."""
    full = dict(os.environ, **(env or {}))
    src = str(pathlib.Path(lx.__file__).parent.parent)
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [src, full.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *python_args, "-c", code],
        env=full,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


#
# Tolerances.
#


@beartype
def tolerance(dtype: Any) -> float:
    """Relative (and absolute, for O(1) data) tolerance for results in `dtype`."""
    if jnp.finfo(dtype).bits <= 32:
        return 1e-4
    return 1e-10


def assert_close(actual: Any, desired: Any, dtype: Any, scale: float = 1.0) -> None:
    """Compare a (PyTree of) array(s) with a NumPy reference, in `dtype`'s tolerance.

    `scale` multiplies the absolute tolerance (for data much larger than 1).
    """
    tol = tolerance(dtype)
    actual_leaves = jtu.tree_leaves(actual)
    desired_leaves = jtu.tree_leaves(desired)
    assert len(actual_leaves) == len(desired_leaves)
    for a, d in zip(actual_leaves, desired_leaves):
        a = np.asarray(a)
        d = np.asarray(d)
        assert a.shape == d.shape, (a.shape, d.shape)
        np.testing.assert_allclose(a, d, rtol=tol, atol=tol * scale)


#
# Flattening PyTree vectors (in leaf order, like `as_matrix`).
#


@jaxtyped(typechecker=beartype)
def flatten(tree: PyTree[Any]) -> Shaped[np.ndarray, " size"]:
    """Ravel and concatenate the leaves of `tree` into a 1-D NumPy array in
    float64/complex128."""
    leaves = [np.asarray(x) for x in jtu.tree_leaves(tree)]
    dtype = np.complex128 if any(np.iscomplexobj(x) for x in leaves) else np.float64
    return np.concatenate([np.reshape(x, -1).astype(dtype) for x in leaves])


def flatten_jax(tree: PyTree[Array]) -> Array:
    """Like `flatten`, but traceable (a JAX array of the leaves' dtype)."""
    leaves = jtu.tree_leaves(tree)
    return jnp.concatenate([jnp.reshape(x, -1) for x in leaves])


def unflatten(flat: Any, structure: Structure) -> PyTree[Array]:
    """Split a 1-D array into a PyTree of JAX arrays with `structure` (traceable);
    the leaves are cast to the structure's dtypes."""
    leaves, treedef = jtu.tree_flatten(structure)
    out, start = [], 0
    for leaf in leaves:
        size = int(np.prod(leaf.shape))
        piece = jnp.asarray(flat)[start : start + size]
        out.append(jnp.reshape(piece, leaf.shape).astype(leaf.dtype))
        start += size
    return jtu.tree_unflatten(treedef, out)


def size_of(structure: Structure) -> int:
    return sum(int(np.prod(x.shape)) for x in jtu.tree_leaves(structure))


def flat_structure(size: int, dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((size,), jnp.dtype(dtype))


def with_dtype(structure: Structure, dtype: Any) -> Structure:
    return jtu.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), structure
    )


#
# Random data. Everything is generated in float64/complex128 and then rounded to
# the test dtype, so that the NumPy reference describes exactly the stored values.
#


def is_complex(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.complexfloating)


def round_to(x: Any, dtype: Any) -> np.ndarray:
    """`x` rounded to `dtype`, returned in float64/complex128."""
    wide = np.complex128 if is_complex(dtype) else np.float64
    return np.asarray(np.asarray(x).astype(jnp.dtype(dtype)), wide)


def randn(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    x = rng.standard_normal(shape)
    if is_complex(dtype):
        x = x + 1j * rng.standard_normal(shape)
    return round_to(x, dtype)


@jaxtyped(typechecker=beartype)
def random_vector(rng: np.random.Generator, structure: Structure) -> PyTree[Array]:
    """A random PyTree of JAX arrays with the given structure."""
    return jtu.tree_map(
        lambda s: jnp.asarray(randn(rng, s.shape, s.dtype), s.dtype), structure
    )


@jaxtyped(typechecker=beartype)
def random_matrix(
    rng: np.random.Generator, out_size: int, in_size: int, dtype: Any, tags: Any = ()
) -> Inexact[np.ndarray, "{out_size} {in_size}"]:
    """A random dense matrix (float64/complex128 values, rounded to `dtype`) that has
    the structure that `tags` describe.

    Sparsity tags (diagonal, tridiagonal, lower/upper triangular) zero entries;
    `symmetric_tag` makes it equal to its transpose; `positive_semidefinite_tag`
    / `negative_semidefinite_tag` make it Hermitian positive/negative definite
    (and well conditioned); `unit_diagonal_tag` sets the diagonal to one.
    """
    tags = _as_set(tags)
    a = randn(rng, (out_size, in_size), dtype)
    if tags and out_size != in_size:
        raise ValueError("tags describe square matrices")
    n = in_size
    definite = tags & {lx.positive_semidefinite_tag, lx.negative_semidefinite_tag}
    if lx.diagonal_tag in tags:
        a = np.diag(np.diag(a))
    elif lx.tridiagonal_tag in tags:
        a = np.triu(np.tril(a, 1), -1)
    if definite:
        if tags & {lx.lower_triangular_tag, lx.upper_triangular_tag}:
            raise ValueError("a definite triangular matrix would be diagonal")
        if lx.diagonal_tag in tags:
            a = np.diag(1 + np.abs(np.diag(a)))
        elif lx.tridiagonal_tag in tags:
            lower = np.diag(a, -1)
            a = np.diag(lower, -1) + np.diag(lower.conj(), 1)
            a = a + np.diag(1 + 2 * np.abs(a).sum(axis=1))  # diagonally dominant
        else:
            a = a @ a.conj().T + n * np.eye(n)
        if lx.negative_semidefinite_tag in tags:
            a = -a
    elif lx.symmetric_tag in tags:
        a = (a + a.T) / 2
    if lx.lower_triangular_tag in tags:
        a = np.tril(a)
    if lx.upper_triangular_tag in tags:
        a = np.triu(a)
    if lx.unit_diagonal_tag in tags:
        a = a - np.diag(np.diag(a)) + np.eye(n)
    return round_to(a, dtype)


#
# Random PyTree structures, drawn by hypothesis. Few distinct leaf shapes keep the
# number of XLA compilations (which dominate the test time) small.
#

LEAF_SHAPES = ((), (2,), (3,), (2, 2))


@st.composite
def structures(draw: Any, dtype: Any, max_leaves: int = 3) -> Structure:
    """A hypothesis strategy for a PyTree of `jax.ShapeDtypeStruct`s of `dtype`:
    a single leaf, a tuple, a dict, or a nested container, with leaves of ranks 0
    to 2."""
    dtype = jnp.dtype(dtype)
    shapes = draw(
        st.lists(st.sampled_from(LEAF_SHAPES), min_size=1, max_size=max_leaves)
    )
    leaves = [jax.ShapeDtypeStruct(shape, dtype) for shape in shapes]
    container = draw(st.sampled_from(("leaf", "tuple", "dict", "nested")))
    if container == "leaf":
        return leaves[0]
    if container == "tuple":
        return tuple(leaves)
    if container == "dict":
        return {f"k{i}": leaf for i, leaf in enumerate(leaves)}
    return ({"a": leaves[0]}, list(leaves[1:]))


def _as_set(tags: Any) -> frozenset:
    if isinstance(tags, (set, frozenset, list, tuple)):
        return frozenset(tags)
    return frozenset([tags])


#
# Operator factories.
#


def _blocks(
    matrix: np.ndarray, in_structure: Structure, out_structure: Structure, dtype
):
    """Cut a dense matrix into the "PyTree of matrices" of `PyTreeLinearOperator`."""
    in_leaves, in_def = jtu.tree_flatten(in_structure)
    out_leaves, out_def = jtu.tree_flatten(out_structure)
    rows, r = [], 0
    for out_leaf in out_leaves:
        n_rows = int(np.prod(out_leaf.shape))
        row, c = [], 0
        for in_leaf in in_leaves:
            n_cols = int(np.prod(in_leaf.shape))
            block = matrix[r : r + n_rows, c : c + n_cols]
            row.append(
                jnp.asarray(block.reshape(out_leaf.shape + in_leaf.shape), dtype)
            )
            c += n_cols
        rows.append(jtu.tree_unflatten(in_def, row))
        r += n_rows
    return jtu.tree_unflatten(out_def, rows)


def _reference(matrix: Any, dtype: Any) -> np.ndarray | None:
    """`matrix` rounded to `dtype` (float64/complex128), or `None` for a JAX array
    (possibly traced), of which the caller holds the reference."""
    return None if isinstance(matrix, jax.Array) else round_to(matrix, dtype)


def _pytree(matrix, dtype, tags, in_structure, out_structure):
    pytree = _blocks(matrix, in_structure, out_structure, dtype)
    op = lx.PyTreeLinearOperator(pytree, out_structure, tags)
    return op, _reference(matrix, dtype)


def _matrix(matrix, dtype, tags, in_structure, out_structure):
    del in_structure, out_structure
    op = lx.MatrixLinearOperator(jnp.asarray(matrix, dtype), tags)
    return op, _reference(matrix, dtype)


def _function(matrix, dtype, tags, in_structure, out_structure):
    m = jnp.asarray(matrix, dtype)

    def fn(x):
        return unflatten(m @ flatten_jax(x), out_structure)

    op = lx.FunctionLinearOperator(fn, in_structure, tags)
    return op, _reference(matrix, dtype)


def _jacobian_fn(x: Any, args: Any, out_structure: Structure) -> PyTree[Array]:
    """`M x + P (x - c)**2`: nonlinear, with Jacobian `M` at `x = c`."""
    m, p, c = args
    xf = flatten_jax(x)
    return unflatten(m @ xf + p @ (xf - c) ** 2, out_structure)


def _jacobian_args(rng, matrix, dtype, in_structure):
    x0 = random_vector(rng, in_structure)
    p = jnp.asarray(randn(rng, matrix.shape, dtype), dtype)
    args = (jnp.asarray(matrix, dtype), p, flatten_jax(x0))
    return x0, args


def _make_jacobian(jac):
    def factory(matrix, dtype, tags, in_structure, out_structure, rng):
        x0, args = _jacobian_args(rng, matrix, dtype, in_structure)

        def fn(x, args):
            return _jacobian_fn(x, args, out_structure)

        op = lx.JacobianLinearOperator(fn, x0, args, tags, jac=jac)
        return op, _reference(matrix, dtype)

    return factory


def _jacobian_custom_vjp(matrix, dtype, tags, in_structure, out_structure, rng):
    """`jac="bwd"` with a `jax.custom_vjp` function, which has no JVP rule."""
    x0, args = _jacobian_args(rng, matrix, dtype, in_structure)

    @jax.custom_vjp
    def fn(x, args):
        return _jacobian_fn(x, args, out_structure)

    def fn_fwd(x, args):
        return fn(x, args), (x, args)

    def fn_bwd(residuals, cotangent):
        x, (m, p, c) = residuals
        ct = flatten_jax(cotangent)
        d = flatten_jax(x) - c
        # JAX's (unconjugated) cotangent convention: ct_x = J^T ct.
        pt_ct = p.T @ ct
        ct_x = m.T @ ct + 2 * d * pt_ct
        ct_args = (jnp.outer(ct, flatten_jax(x)), jnp.outer(ct, d**2), -2 * d * pt_ct)
        return unflatten(ct_x, in_structure), ct_args

    fn.defvjp(fn_fwd, fn_bwd)
    op = lx.JacobianLinearOperator(fn, x0, args, tags, jac="bwd")
    return op, _reference(matrix, dtype)


def _diagonal(matrix, dtype, tags, in_structure, out_structure):
    del tags, out_structure
    diag = jnp.diagonal(jnp.asarray(matrix))
    op = lx.DiagonalLinearOperator(unflatten(diag, in_structure))
    ref = _reference(matrix, dtype)
    return op, None if ref is None else np.diag(np.diag(ref))


def _tridiagonal(matrix, dtype, tags, in_structure, out_structure):
    del tags, in_structure, out_structure
    bands = [jnp.diagonal(jnp.asarray(matrix), k) for k in (0, -1, 1)]
    op = lx.TridiagonalLinearOperator(*[jnp.asarray(b, dtype) for b in bands])
    ref = _reference(matrix, dtype)
    return op, None if ref is None else np.triu(np.tril(ref, 1), -1)


def _identity(matrix, dtype, tags, in_structure, out_structure):
    del tags
    m, n = matrix.shape
    if size_of(out_structure) != size_of(in_structure):
        out_structure = in_structure
    op = lx.IdentityLinearOperator(in_structure, out_structure)
    return op, np.eye(n, dtype=round_to(matrix, dtype).dtype)


def _tagged(matrix, dtype, tags, in_structure, out_structure):
    inner, ref = _function(matrix, dtype, (), in_structure, out_structure)
    return lx.TaggedLinearOperator(inner, tags), ref


_UNIT = frozenset([unit])


def _add(matrix, dtype, tags, in_structure, out_structure):
    # Two kinds of operand; each keeps the structure of `matrix` (a unit diagonal
    # excepted), so the sum does too.
    tags = _as_set(tags) - _UNIT
    a, ref_a = _pytree(0.75 * matrix, dtype, tags, in_structure, out_structure)
    b, ref_b = _function(0.25 * matrix, dtype, tags, in_structure, out_structure)
    assert ref_a is not None and ref_b is not None  # a NumPy `matrix`
    return a + b, ref_a + ref_b


def _scalar(dtype: Any) -> Array:
    return jnp.asarray(1.5, dtype)


def _mul(matrix, dtype, tags, in_structure, out_structure):
    s = _scalar(dtype)
    inner, ref = _pytree(
        matrix / 1.5, dtype, _as_set(tags) - _UNIT, in_structure, out_structure
    )
    return inner * s, ref * round_to(s, dtype)


def _div(matrix, dtype, tags, in_structure, out_structure):
    s = _scalar(dtype)
    inner, ref = _pytree(
        matrix * 1.5, dtype, _as_set(tags) - _UNIT, in_structure, out_structure
    )
    return inner / s, ref / round_to(s, dtype)


def _neg(matrix, dtype, tags, in_structure, out_structure):
    tags = _as_set(tags) - _UNIT
    swapped = {psd: nsd, nsd: psd}
    tags = frozenset(swapped.get(t, t) for t in tags)
    inner, ref = _pytree(-matrix, dtype, tags, in_structure, out_structure)
    assert ref is not None  # a NumPy `matrix`
    return -inner, -ref


def _composed(matrix, dtype, tags, in_structure, out_structure, rng):
    # `(M D^-1) @ D`, with `D` diagonal; the sparsity tags that products keep are
    # declared on the operands.
    n = matrix.shape[1]
    d = round_to(1 + rng.uniform(size=n), dtype)
    kept = _as_set(tags) & {
        lx.diagonal_tag,
        lx.tridiagonal_tag,
        lx.lower_triangular_tag,
        lx.upper_triangular_tag,
    }
    a, ref_a = _pytree(matrix / d, dtype, kept, in_structure, out_structure)
    b = lx.DiagonalLinearOperator(unflatten(d, in_structure))
    return a @ b, ref_a * d


def _tangent(matrix, dtype, tags, in_structure, out_structure, rng):
    # The primal is unrelated to `matrix`; `mv` is linear in the tangent.
    m, n = matrix.shape
    primal_matrix = random_matrix(rng, m, n, dtype, tags)
    primal, _ = _pytree(primal_matrix, dtype, tags, in_structure, out_structure)
    tangent, ref = _pytree(matrix, dtype, tags, in_structure, out_structure)
    return lx.TangentLinearOperator(primal, tangent), ref


Factory = Callable[..., tuple[lx.AbstractLinearOperator, np.ndarray]]

# `factory(matrix, dtype, tags, in_structure, out_structure[, rng])`. Those taking
# an `rng` draw extra random data (a linearisation point, a primal, ...).
OPERATOR_FACTORIES: dict[str, Factory] = {
    "matrix": _matrix,
    "pytree": _pytree,
    "function": _function,
    "jacobian": _make_jacobian(None),
    "jacobian_fwd": _make_jacobian("fwd"),
    "jacobian_bwd": _make_jacobian("bwd"),
    "jacobian_custom_vjp": _jacobian_custom_vjp,
    "diagonal": _diagonal,
    "tridiagonal": _tridiagonal,
    "identity": _identity,
    "tagged": _tagged,
    "add": _add,
    "mul": _mul,
    "div": _div,
    "neg": _neg,
    "composed": _composed,
    "tangent": _tangent,
}
_NEEDS_RNG = {"jacobian", "jacobian_fwd", "jacobian_bwd", "jacobian_custom_vjp"}
_NEEDS_RNG |= {"composed", "tangent"}

KINDS = tuple(OPERATOR_FACTORIES)
# Kinds acting on 1-D arrays only (structures are ignored).
FLAT_KINDS = frozenset({"matrix", "tridiagonal"})
# Kinds that need a square matrix (and use the input structure for the output).
SQUARE_KINDS = frozenset({"diagonal", "tridiagonal", "identity"})
# Kinds that represent only part of `matrix`: its diagonal, its three central
# bands, or (ignoring it) the identity. Their reference says which.
PARTIAL_KINDS = SQUARE_KINDS
# Kinds whose `mv` goes through a `jax.custom_vjp` (no forward-mode autodiff).
NO_JVP_KINDS = frozenset({"jacobian_custom_vjp"})
# Kinds that are matrix-free: `materialise` must turn them into array-holding ones.
MATRIX_FREE_KINDS = frozenset(
    {
        "function",
        "jacobian",
        "jacobian_fwd",
        "jacobian_bwd",
        "jacobian_custom_vjp",
        "tagged",
    }
)


@jaxtyped(typechecker=beartype)
def make_operator(
    kind: str,
    matrix: NumpyMatrix,
    dtype: Any,
    tags: Any = (),
    in_structure: Structure | None = None,
    out_structure: Structure | None = None,
    seed: int = 0,
) -> tuple[lx.AbstractLinearOperator, Shaped[np.ndarray, "m n"]]:
    """An operator of the given kind representing `matrix` (in `dtype`).

    **Arguments:**

    - `kind`: a key of `OPERATOR_FACTORIES`.
    - `matrix`: the dense matrix, shape `(out_size, in_size)`; it should have the
        structure `tags` describe (see `random_matrix`).
    - `dtype`: the dtype of the operator's arrays and structures.
    - `tags`: tags declared on the operator (or on the operands, for arithmetic
        kinds, where the arithmetic keeps them; `composed` keeps only sparsity
        tags, `diagonal`/`tridiagonal`/`identity` have no tags).
    - `in_structure`, `out_structure`: PyTrees of `jax.ShapeDtypeStruct` of sizes
        `in_size`/`out_size` (their dtypes are replaced by `dtype`); `None` for a
        1-D array. `FLAT_KINDS` ignore them; `SQUARE_KINDS` use `in_structure` for
        both (`identity` keeps `out_structure` when the sizes agree).
    - `seed`: for the kinds that draw extra random data.

    **Returns:**

    `(operator, reference)`, `reference` being the dense float64/complex128 NumPy
    matrix that `operator.as_matrix()` should equal.
    """
    matrix = np.asarray(matrix)
    m, n = matrix.shape
    dtype = jnp.dtype(dtype)
    if in_structure is None or kind in FLAT_KINDS:
        in_structure = flat_structure(n, dtype)
    if out_structure is None or kind in FLAT_KINDS:
        out_structure = flat_structure(m, dtype)
    in_structure = with_dtype(in_structure, dtype)
    out_structure = with_dtype(out_structure, dtype)
    if size_of(in_structure) != n or size_of(out_structure) != m:
        raise ValueError("structure sizes do not match the matrix")
    if kind in SQUARE_KINDS and m != n:
        raise ValueError(f"kind {kind!r} needs a square matrix")
    factory = OPERATOR_FACTORIES[kind]
    args = (matrix, dtype, _as_set(tags), in_structure, out_structure)
    if kind in _NEEDS_RNG:
        return factory(*args, np.random.default_rng(seed))
    return factory(*args)


@jaxtyped(typechecker=beartype)
def random_operator(
    kind: str,
    dtype: Any,
    in_structure: Structure,
    out_structure: Structure,
    tags: Any = (),
    seed: int = 0,
) -> tuple[lx.AbstractLinearOperator, Shaped[np.ndarray, "m n"]]:
    """`make_operator` of a `random_matrix` (sized from the structures)."""
    rng = np.random.default_rng(seed)
    if kind in FLAT_KINDS:
        in_structure = flat_structure(size_of(in_structure), dtype)
        out_structure = flat_structure(size_of(out_structure), dtype)
    if kind in SQUARE_KINDS or tags:
        if kind != "identity" or size_of(out_structure) != size_of(in_structure):
            out_structure = in_structure
    n, m = size_of(in_structure), size_of(out_structure)
    matrix = random_matrix(rng, m, n, dtype, tags)
    return make_operator(
        kind, matrix, dtype, tags, in_structure, out_structure, seed + 1
    )


f64 = jnp.float64

# Small operators and predicate helpers shared by the operator-layer tests.

PREDICATES = {
    "symmetric": lx.is_symmetric,
    "diagonal": lx.is_diagonal,
    "tridiagonal": lx.is_tridiagonal,
    "lower": lx.is_lower_triangular,
    "upper": lx.is_upper_triangular,
    "psd": lx.is_positive_semidefinite,
    "nsd": lx.is_negative_semidefinite,
    "unit": lx.has_unit_diagonal,
}


def true_predicates(operator: lx.AbstractLinearOperator) -> set[str]:
    return {name for name, pred in PREDICATES.items() if pred(operator)}


def same_structure(a: Any, b: Any) -> bool:
    def key(s):
        return (s.shape, jnp.dtype(s.dtype))

    return jtu.tree_structure(a) == jtu.tree_structure(b) and [
        key(x) for x in jtu.tree_leaves(a)
    ] == [key(x) for x in jtu.tree_leaves(b)]


def randn_like(rng, x):
    out = rng.standard_normal(x.shape)
    if jnp.iscomplexobj(x):
        out = out + 1j * rng.standard_normal(x.shape)
    return out


def _mat(tags=(), n=3, dtype=f64):
    return lx.MatrixLinearOperator(
        jnp.asarray(random_matrix(np.random.default_rng(0), n, n, dtype, tags), dtype),
        tags,
    )


def _fun(tags=()):
    matrix = jnp.asarray(random_matrix(np.random.default_rng(1), 3, 3, f64, tags))
    return lx.FunctionLinearOperator(lambda x: matrix @ x, flat_structure(3, f64), tags)


def _jac(tags=(), jac=None):
    op, _ = random_operator(
        {None: "jacobian", "fwd": "jacobian_fwd", "bwd": "jacobian_bwd"}[jac],
        f64,
        flat_structure(3, f64),
        flat_structure(3, f64),
        tags,
    )
    return op


def _pyt(tags=()):
    s = {"a": jax.ShapeDtypeStruct((2,), f64), "b": jax.ShapeDtypeStruct((), f64)}
    return random_operator("pytree", f64, s, s, tags)[0]


_S = flat_structure(3, f64)


#
# Solver cases: a solver, the kind of matrix it accepts, and the tags that matrix
# needs. Operators are made from a dense reference matrix in several
# representations (`CASE_KINDS`), so one float64 NumPy reference
# (`pinv_solution`) checks them all.
#


@dataclasses.dataclass(frozen=True)
class SolverCase:
    name: str
    solver: lx.AbstractLinearSolver
    matrix_kind: str  # see `make_matrix`
    tags: tuple = ()
    # Iterative solvers: the solver at a tolerance (`rtol = atol = tol`).
    make: Callable[[float], lx.AbstractLinearSolver] | None = None

    def with_tolerance(self, tol: float) -> lx.AbstractLinearSolver:
        assert self.make is not None, "not an iterative solver"
        return self.make(tol)


# Sizes are small: these tests check correctness, and compile time is per shape.
SHAPES = {
    "square": (5, 5),
    "tall": (7, 4),
    "wide": (4, 7),
    "rank_deficient": (6, 5),
    "rank_deficient_square": (5, 5),
    "spd": (5, 5),
    "nsd": (5, 5),
    "symmetric": (5, 5),
    "diagonal": (5, 5),
    "diagonal_singular": (5, 5),
    "lower": (5, 5),
    "upper": (5, 5),
    "unit_lower": (5, 5),
    "tridiagonal": (6, 6),
}


@jaxtyped(typechecker=beartype)
def make_matrix(
    kind: str, dtype: Any, seed: int = 0, size: int | None = None
) -> Inexact[np.ndarray, "m n"]:
    """A reference matrix (NumPy, float64 or complex128) of the given kind (a key of
    `SHAPES`; `size` overrides a square kind's size), rounded to `dtype` so that
    the reference solves the same problem as lineax."""
    rng = np.random.default_rng(seed)
    m, n = SHAPES[kind] if size is None else (size, size)

    def randn_(*shape):
        x = rng.standard_normal(shape)
        if is_complex(dtype):
            x = x + 1j * rng.standard_normal(shape)
        return x

    if kind in ("square", "tall", "wide"):
        a = randn_(m, n)
        k = min(m, n)
        # Keep it well conditioned (the eigenvalues of `randn_(k, k)` fill a disc
        # of radius about sqrt(k)).
        a[:k, :k] += (3.0 if k <= 5 else 2 * np.sqrt(k)) * np.eye(k)
    elif kind == "rank_deficient":
        a = randn_(m, 2) @ randn_(2, n)
    elif kind == "rank_deficient_square":
        a = randn_(m, 3) @ randn_(3, n)
    elif kind in ("spd", "nsd"):
        b = randn_(n, n)
        a = b @ b.conj().T + n * np.eye(n)
        if kind == "nsd":
            a = -a
    elif kind == "symmetric":  # indefinite
        b = randn_(n, n)
        a = b + b.T + np.diag(np.where(np.arange(n) % 2, 3.0, -3.0))
    elif kind == "diagonal":
        a = np.diag(randn_(n) + 3 * np.sign(rng.standard_normal(n)))
    elif kind == "diagonal_singular":
        d = randn_(n) + 3
        d[1] = 0
        a = np.diag(d)
    elif kind in ("lower", "upper", "unit_lower"):
        a = np.tril(randn_(n, n)) + 4 * np.eye(n)
        if kind == "unit_lower":
            a = a - np.diag(np.diag(a)) + np.eye(n)
        if kind == "upper":
            a = a.T
    elif kind == "tridiagonal":
        a = (
            np.diag(randn_(n) + 5)
            + np.diag(randn_(n - 1), -1)
            + np.diag(randn_(n - 1), 1)
        )
    else:
        raise ValueError(kind)
    return round_to(a, dtype)


def split_structure(size: int, dtype: Any, variant: int) -> Structure:
    """A PyTree structure of total size `size` (at least 4) with leaves of ranks 0
    to 2."""
    if variant == 0:
        return {
            "a": jax.ShapeDtypeStruct((), dtype),
            "b": jax.ShapeDtypeStruct((size - 1,), dtype),
        }
    return (
        jax.ShapeDtypeStruct((2, 1), dtype),
        jax.ShapeDtypeStruct((size - 2,), dtype),
    )


# The representations `case_operator` makes of a solver case's matrix.
CASE_KINDS = ("matrix", "pytree", "function", "jacobian", "native", "tagged_composed")
# The structured operators (issue 12) that `case_operator` also makes, each holding
# the whole matrix so that any case applies: drawn where the "matrix" kind is.
STRUCTURED_KINDS = ("sparse", "kronecker", "block_diagonal")


def case_operator(
    kind: str, matrix: Inexact[Array, "m n"], tags: tuple = ()
) -> lx.AbstractLinearOperator:
    """Represent the dense (JAX, possibly traced) `matrix` as an operator of one of
    `CASE_KINDS` or `STRUCTURED_KINDS`, declaring `tags`: the operator factories
    above, with the PyTree kind on `split_structure`s, `native` the structured
    class for the tags (if any), `tagged_composed` `(M / 2) @ (2 I)` tagged on
    the outside, and the structured operators holding the whole matrix."""
    m, n = matrix.shape
    dtype = matrix.dtype
    flat_in, flat_out = flat_structure(n, dtype), flat_structure(m, dtype)
    tag_set = _as_set(tags)
    if kind == "pytree":
        in_s, out_s = split_structure(n, dtype, 0), split_structure(m, dtype, 1)
        return _pytree(matrix, dtype, tag_set, in_s, out_s)[0]
    if kind == "native":
        if lx.diagonal_tag in tag_set:
            return _diagonal(matrix, dtype, tag_set, flat_in, flat_out)[0]
        if lx.tridiagonal_tag in tag_set:
            return _tridiagonal(matrix, dtype, tag_set, flat_in, flat_out)[0]
        kind = "matrix"
    if kind == "sparse":
        nse = m * n  # static under `jit`
        return lx.SparseLinearOperator(jsparse.BCOO.fromdense(matrix, nse=nse), tags)
    if kind == "kronecker":
        # `M ⊗ [1]` is `M`; tagged on the outside, which the structured solve
        # must see through.
        one = lx.MatrixLinearOperator(jnp.ones((1, 1), dtype))
        product = lx.KroneckerLinearOperator(lx.MatrixLinearOperator(matrix), one)
        return lx.TaggedLinearOperator(product, tags) if tags else product
    if kind == "block_diagonal":
        return lx.BlockDiagonalLinearOperator([lx.MatrixLinearOperator(matrix, tags)])
    if kind == "tagged_composed":
        half = lx.MatrixLinearOperator(matrix) / 2.0
        double = lx.IdentityLinearOperator(flat_in) * jnp.asarray(2.0, dtype)
        return lx.TaggedLinearOperator(half @ double, tag_set)
    factory = OPERATOR_FACTORIES[kind]
    args = (matrix, dtype, tag_set, flat_in, flat_out)
    if kind in _NEEDS_RNG:
        return factory(*args, np.random.default_rng(0))[0]
    return factory(*args)[0]


def make_vector(operator: lx.AbstractLinearOperator, seed: int = 1) -> PyTree[Array]:
    """A random right-hand side for `operator`."""
    return random_vector(np.random.default_rng(seed), operator.out_structure())


def pinv_solution(
    matrix: np.ndarray, vector: np.ndarray, dtype: Any = jnp.float64
) -> np.ndarray:
    """The pseudoinverse solution in float64, treating as zero the singular values
    that rounding to `dtype` may have created."""
    rcond = 10 * max(matrix.shape) * float(jnp.finfo(dtype).eps)
    return np.linalg.pinv(matrix, rcond=rcond) @ vector


# The direct solvers.
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

# The Krylov solvers, at float64 tolerances (`SolverCase.with_tolerance` for
# others): CG on positive definite, MINRES on symmetric indefinite, GMRES and
# BiCGStab on general square, LSMR on square and rectangular matrices.


def _normal_cg(t: float) -> lx.Normal:
    # The deprecated alias: it warns, as lineax 0.1.1's does.
    with pytest.warns(DeprecationWarning, match="NormalCG"):
        return lx.NormalCG(t, t)


def _krylov(name: str, make: Callable, matrix_kind: str, tags: tuple = ()):
    return SolverCase(name, make(1e-10), matrix_kind, tags, make)


KRYLOV_CASES = [
    _krylov("cg", lambda t: lx.CG(t, t), "spd", (psd,)),
    _krylov("minres", lambda t: lx.MINRES(t, t), "symmetric", (lx.symmetric_tag,)),
    _krylov("gmres", lambda t: lx.GMRES(t, t), "square"),
    _krylov("bicgstab", lambda t: lx.BiCGStab(t, t), "square"),
    _krylov("lsmr", lambda t: lx.LSMR(t, t), "square"),
    _krylov("lsmr_tall", lambda t: lx.LSMR(t, t), "tall"),
    _krylov("lsmr_wide", lambda t: lx.LSMR(t, t), "wide"),
    _krylov("normal_cg", lambda t: _normal_cg(t), "square"),
]

CASES_BY_NAME = {case.name: case for case in SOLVER_CASES + KRYLOV_CASES}


def sample(items: Iterable, part: int = 0, parts: int = 2) -> list:
    """The `part`-th of `parts` slices of a fixed-seed shuffle of `items` (all of
    them with `LINEAX_EXHAUSTIVE=1`): tests that take the slices `0..parts-1` see
    every item between them, and each compiles only its slice. (Order kept.)"""
    items = list(items)
    if EXHAUSTIVE:
        return items
    order = np.random.default_rng(0).permutation(len(items))
    return [items[i] for i in sorted(order[part::parts])]


def krylov_sample(part: int, parts: int = 3) -> list:
    """`sample` of `KRYLOV_CASES`: a test that takes one slice compiles few Krylov
    solves."""
    return sample(KRYLOV_CASES, part, parts)


class DelegatingLU(lx.AbstractLinearSolver):
    """A user-defined solver that does what `lx.LU()` does, for tests of what
    `linear_solve` does with solvers written outside lineax: subclasses override
    the method under test."""

    # `Any` state: subclasses keep more than an `LUState` in it.
    def init(self, operator, options) -> Any:
        return lx.LU().init(operator, options)

    def compute(self, state: Any, vector, options) -> Any:
        return lx.LU().compute(state, vector, options)

    def transpose(self, state, options):
        return lx.LU().transpose(state, options)

    def conj(self, state, options):
        return lx.LU().conj(state, options)

    def assume_full_rank(self):
        return True


class NegatingLU(DelegatingLU):
    """Solves for `-x`, through a function kept in its state: its solution is not
    all arrays, so an un-jitted solve takes the static-output path
    (`_linear_solve._static_output`)."""

    def init(self, operator, options):
        return super().init(operator, options), jnp.negative

    def compute(self, state, vector, options):
        state, negate = state
        solution, result, stats = super().compute(state, vector, options)
        return negate(solution), result, stats


def central_differences(
    f: Callable[[np.ndarray], Any], x: np.ndarray, eps: float = 1e-6
) -> np.ndarray:
    """Central finite differences of the scalar `f` at `x`, entry by entry (the
    gradient of `f` in float64, as a reference)."""
    out = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = eps
        out[index] = (f(x + step) - f(x - step)) / (2 * eps)
    return out


def hlo_computations(text: str) -> dict[str, list[str]]:
    """The instruction lines of each computation of an optimised HLO module's text
    (`jax.jit(f).lower(...).compile().as_text()`), by computation name."""
    out, name = {}, None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header:
            name = header.group(1)
            out[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            out[name].append(line)
    return out


def float32_user() -> contextlib.ExitStack:
    """A default JAX user: float32 (x64 disabled) and standard dtype promotion;
    the test session runs in float64 with strict promotion."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.enable_x64(False))
    stack.enter_context(jax.numpy_dtype_promotion("standard"))
    return stack


def backend_compiles(fn):
    """`fn()` (blocked until ready), and the XLA compiles it made (JAX's
    `backend_compile` events): a count, never a clock."""
    compiles = []

    def listener(event: str, duration_secs: float, **kwargs: str | int) -> None:
        if "backend_compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        out = jax.block_until_ready(fn())
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return out, compiles
