"""The linear-operator layer: every operator kind against its dense NumPy matrix,
under `jit`/`vmap`/`jvp`; predicates and tags; construction errors; and
`lineax.internal`.

The operator kinds come from the shared table in `helpers.py`. Hypothesis draws
structures, dtypes and tags; the default ("ci") profile samples a few examples per
kind, `LINEAX_EXHAUSTIVE=1` many more.
"""

import functools as ft
from typing import Any

import equinox as eqx
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from conftest import EXHAUSTIVE, raises_message
from helpers import (
    _fun,
    _mat,
    _pyt,
    _S,
    assert_close,
    diag,
    DTYPES,
    flat_structure,
    flatten,
    flatten_jax,
    KINDS,
    lower,
    MATRIX_FREE_KINDS,
    NO_JVP_KINDS,
    nsd,
    psd,
    randn_like,
    random_matrix,
    random_operator,
    random_vector,
    recorded_jax_only,
    round_to,
    same_structure,
    sample,
    SQUARE_KINDS,
    structures,
    sym,
    tri,
    true_predicates,
    unflatten,
    unit,
    upper,
)

import lineax as lx


f32, f64, c128 = jnp.float32, jnp.float64, jnp.complex128


# Consistent tag sets (each describes a square matrix that `random_matrix` makes).
TAG_SETS = (
    (),
    (sym,),
    (psd,),
    (nsd,),
    (diag,),
    (tri,),
    (sym, tri),
    (lower,),
    (upper,),
    (lower, unit),
    (diag, psd),
)


def _examples(n: int) -> Any:
    """`n` examples in the default profile; the profile's count with
    `LINEAX_EXHAUSTIVE=1`."""
    if EXHAUSTIVE:
        return hypothesis.settings()
    return hypothesis.settings(max_examples=n)


def matrix_free_parts(operator: lx.AbstractLinearOperator) -> list:
    is_free = lambda x: isinstance(
        x, (lx.FunctionLinearOperator, lx.JacobianLinearOperator)
    )
    return [x for x in jtu.tree_leaves(operator, is_leaf=is_free) if is_free(x)]


@st.composite
def operator_cases(draw: Any, kind: str, dtypes: tuple = DTYPES) -> tuple:
    """`(operator, reference, dtype, tags, in_structure, out_structure, seed)`."""
    dtype = draw(st.sampled_from(dtypes))
    in_structure = draw(structures(dtype))
    out_structure = draw(structures(dtype))
    tags = draw(st.sampled_from(TAG_SETS)) if kind not in ("identity",) else ()
    if tags or kind in SQUARE_KINDS:
        out_structure = in_structure
    if kind == "identity" and draw(st.booleans()):
        # Identity between different structures of the same size.
        out_structure = flat_structure(
            sum(x.size for x in jtu.tree_leaves(in_structure)), dtype
        )
    seed = draw(st.integers(0, 2**16))
    op, ref = random_operator(kind, dtype, in_structure, out_structure, tags, seed)
    return op, ref, dtype, tags, in_structure, out_structure, seed


#
# Every operator against its dense matrix.
#


@pytest.mark.parametrize("kind", KINDS)
@_examples(2)
@hypothesis.given(data=st.data())
def test_operator_matches_matrix(kind, data):
    op, ref, dtype, tags, in_structure, out_structure, seed = data.draw(
        operator_cases(kind)
    )
    rng = np.random.default_rng(seed)
    m, n = ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    close = ft.partial(assert_close, dtype=dtype, scale=scale)

    assert isinstance(op, lx.AbstractLinearOperator)
    assert (op.in_size(), op.out_size()) == (n, m)
    if kind not in ("matrix", "tridiagonal"):
        assert same_structure(op.in_structure(), in_structure)
        assert same_structure(op.out_structure(), out_structure)

    x = random_vector(rng, op.in_structure())
    w = random_vector(rng, op.out_structure())
    y = op.mv(x)
    assert same_structure(jax.eval_shape(lambda: y), op.out_structure())
    close(flatten(y), ref @ flatten(x))
    # Transpose, not conjugate transpose.
    for transposed in (op.transpose(), op.T):
        assert same_structure(transposed.in_structure(), op.out_structure())
        assert same_structure(transposed.out_structure(), op.in_structure())

    # Structure only (values below): shapes, types and tags of derived operators.
    materialised = eqx.filter_eval_shape(lx.materialise, op)
    assert matrix_free_parts(materialised) == []
    assert true_predicates(materialised) == true_predicates(op)
    linearised = eqx.filter_eval_shape(lx.linearise, op)
    assert true_predicates(linearised) == true_predicates(op)
    # (A superset: the default `conj` re-tags from the predicates, and a 1x1
    # operator is diagonal without its other predicates saying so.)
    assert true_predicates(eqx.filter_eval_shape(lx.conj, op)) >= true_predicates(op)

    # The dense computations, compiled at once (much faster than op-by-op).
    params, fn = _operator_functions(op)
    out = jax.jit(fn)(params, x, w)
    expected = _expected(ref, x, w)
    # (Known bug, see `test_tangent_tridiagonal_of_diagonal`.)
    if kind == "tangent" and lx.is_diagonal(op):
        del out["tridiagonal"], expected["tridiagonal"]
    for key in expected:
        close(out[key], expected[key])


@pytest.mark.parametrize("kind", sorted(MATRIX_FREE_KINDS - {"tagged"}))
def test_materialise_gives_array_operator(kind):
    structure = {
        "a": jax.ShapeDtypeStruct((2,), f64),
        "b": jax.ShapeDtypeStruct((), f64),
    }
    op, ref = random_operator(kind, f64, structure, structure, (sym,))
    materialised = lx.materialise(op)
    assert isinstance(materialised, (lx.MatrixLinearOperator, lx.PyTreeLinearOperator))
    assert lx.is_symmetric(materialised)
    assert_close(materialised.as_matrix(), ref, f64)
    flat_op, _ = random_operator(
        kind, f64, flat_structure(3, f64), flat_structure(3, f64)
    )
    assert isinstance(lx.materialise(flat_op), lx.MatrixLinearOperator)


def test_linearise_jacobian_gives_cheap_function():
    structure = flat_structure(3, f64)
    op, ref = random_operator("jacobian", f64, structure, structure)
    linearised = lx.linearise(op)
    assert isinstance(linearised, lx.FunctionLinearOperator)
    x = jnp.arange(3.0)
    assert_close(linearised.mv(x), ref @ np.arange(3.0), f64)
    # The linearisation holds the point's evaluation: `mv` no longer calls `fn`.
    text = str(jax.make_jaxpr(linearised.mv)(x))
    assert "integer_pow" not in text and "pow" not in text


#
# diagonal / tridiagonal of matrix-free operators probe with 1 / 3 products.
#


class MvCounter:
    """A linear function `x -> M x` that counts matrix-vector products as it is
    traced: a product of a batch of `k` vectors counts `k`."""

    def __init__(self, matrix: np.ndarray, structure: Any):
        self.matrix = jnp.asarray(matrix)
        self.structure = structure
        self.body_calls = 0
        self.batched_calls = 0
        self.batched_products = 0

        @jax.custom_batching.custom_vmap
        def fn(x):
            self.body_calls += 1
            return self._apply(x)

        @fn.def_vmap
        def _(axis_size, in_batched, x):
            self.batched_calls += 1
            self.batched_products += axis_size
            x = jtu.tree_map(
                lambda leaf, b: (
                    leaf if b else jnp.broadcast_to(leaf, (axis_size, *leaf.shape))
                ),
                x,
                in_batched[0],
            )
            return jax.vmap(self._apply)(x), jtu.tree_map(
                lambda _: True, self.structure
            )

        self.fn = fn

    def _apply(self, x):
        return unflatten(self.matrix @ flatten_jax(x), self.structure)

    def reset(self):
        self.body_calls = self.batched_calls = self.batched_products = 0

    @property
    def products(self) -> int:
        # Up to JAX 0.10 a batched call traces the body once too (for its output
        # type); later versions may not. Which one is measured once, below.
        traced = _BATCHED_CALL_TRACES_BODY * self.batched_calls
        return self.batched_products + self.body_calls - traced


def _batched_call_traces_body() -> int:
    counter = MvCounter(np.eye(2), jax.ShapeDtypeStruct((2,), jnp.float64))
    jax.eval_shape(jax.vmap(counter.fn), jnp.zeros((3, 2)))
    assert counter.batched_calls == 1 and counter.body_calls in (0, 1)
    return counter.body_calls


_BATCHED_CALL_TRACES_BODY = _batched_call_traces_body()


_PROBE_STRUCTURES = {
    "flat": flat_structure(8, f64),
    "pytree": (
        jax.ShapeDtypeStruct((2, 2), f64),
        {"a": jax.ShapeDtypeStruct((4,), f64)},
    ),
}


def _counted_operator(tags, structure, wrap):
    matrix = random_matrix(np.random.default_rng(0), 8, 8, f64, tags)
    counter = MvCounter(matrix, structure)
    if wrap:
        op = lx.FunctionLinearOperator(counter.fn, structure, closure_convert=False)
        op = lx.TaggedLinearOperator(op, tags)
    else:
        op = lx.FunctionLinearOperator(
            counter.fn, structure, tags, closure_convert=False
        )
    counter.reset()
    return op, matrix, counter


@pytest.mark.parametrize("structure", list(_PROBE_STRUCTURES))
@pytest.mark.parametrize("wrap", [False, True], ids=["function", "tagged"])
@pytest.mark.parametrize(
    "tags, fn_name, max_products",
    [
        ((diag,), "diagonal", 1),
        ((diag,), "tridiagonal", 1),
        ((tri,), "tridiagonal", 3),
        ((sym, tri), "tridiagonal", 3),
    ],
)
def test_probing_products(tags, fn_name, max_products, structure, wrap):
    op, matrix, counter = _counted_operator(tags, _PROBE_STRUCTURES[structure], wrap)
    out = getattr(lx, fn_name)(op)
    assert counter.products <= max_products
    if fn_name == "diagonal":
        assert_close(out, np.diagonal(matrix), f64)
    else:
        expected = [np.diagonal(matrix, k) for k in (0, -1, 1)]
        assert_close(list(out), expected, f64)
    # The same under jit (closing over the operator: its `fn` is not an array).
    counter.reset()
    out_jit = jax.jit(lambda: getattr(lx, fn_name)(op))()
    assert counter.products <= max_products
    assert_close(out_jit, out, f64)


@recorded_jax_only
def test_probing_untagged_materialises():
    # The counter itself is sound: an untagged operator needs all 8 columns.
    op, matrix, counter = _counted_operator((), _PROBE_STRUCTURES["flat"], False)
    assert_close(lx.diagonal(op), np.diagonal(matrix), f64)
    assert counter.products == 8


def test_probing_diagonal_of_tridiagonal():
    op, matrix, counter = _counted_operator((tri,), _PROBE_STRUCTURES["flat"], False)
    assert_close(lx.diagonal(op), np.diagonal(matrix), f64)
    assert counter.products <= 3


@pytest.mark.parametrize("jac", [None, "fwd", "bwd"])
def test_probing_jacobian(jac):
    structure = flat_structure(5, f64)
    for tags in [(diag,), (tri,)]:
        op, ref = random_operator(
            {None: "jacobian", "fwd": "jacobian_fwd", "bwd": "jacobian_bwd"}[jac],
            f64,
            structure,
            structure,
            tags,
        )
        assert_close(lx.diagonal(op), np.diagonal(ref), f64)
        assert_close(
            list(lx.tridiagonal(op)), [np.diagonal(ref, k) for k in (0, -1, 1)], f64
        )


#
# Transformations: jit, vmap, jvp. One fixed structure per kind keeps compilation
# bounded; the dtypes rotate over the kinds.
#

_IN = {"x": jax.ShapeDtypeStruct((2,), f64), "y": jax.ShapeDtypeStruct((), f64)}
_OUT = (jax.ShapeDtypeStruct((2, 2), f64),)


def _fixed_operator(kind, dtype, seed=0, tags=()):
    out = _IN if kind in SQUARE_KINDS else _OUT
    return random_operator(kind, dtype, _IN, out, tags, seed)


def _rotating(kinds, dtypes):
    return [
        pytest.param(
            k,
            dtypes[i % len(dtypes)],
            id=f"{k}-{jnp.dtype(dtypes[i % len(dtypes)]).name}",
        )
        for i, k in enumerate(kinds)
    ]


def _operator_functions(op):
    """Everything a test computes from an operator, as one function of the
    operator's arrays (so that it can be jitted, vmapped and differentiated)."""
    params, static = eqx.partition(op, eqx.is_array)

    def fn(params, x, w):
        op = eqx.combine(params, static)
        square = op.in_size() == op.out_size()
        # Each derived operator is built once and both its matrix and its product
        # are checked (building one twice only repeats the tracing: for the
        # matrix-free kinds, `materialise` traces a Jacobian).
        materialised = lx.materialise(op)
        conjugated = lx.conj(op)
        return {
            "mv": flatten_jax(op.mv(x)),
            "matrix": op.as_matrix(),
            "transpose": op.transpose().as_matrix(),
            "transpose_mv": flatten_jax(op.T.mv(w)),
            "transpose_transpose": op.T.T.as_matrix(),
            "materialise": materialised.as_matrix(),
            "materialise_mv": flatten_jax(materialised.mv(x)),
            "linearise": flatten_jax(lx.linearise(op).mv(x)),
            "conj": conjugated.as_matrix(),
            "conj_mv": flatten_jax(conjugated.mv(x)),
            "diagonal": lx.diagonal(op),
            "tridiagonal": lx.tridiagonal(op) if square else (),
        }

    return params, fn


def _expected(ref, x, w):
    m, n = ref.shape
    bands = tuple(np.diagonal(ref, k) for k in (0, -1, 1)) if m == n else ()
    return {
        "mv": ref @ flatten(x),
        "matrix": ref,
        "transpose": ref.T,
        "transpose_mv": ref.T @ flatten(w),
        "transpose_transpose": ref,
        "materialise": ref,
        "materialise_mv": ref @ flatten(x),
        "linearise": ref @ flatten(x),
        "conj": ref.conj(),
        "conj_mv": ref.conj() @ flatten(x),
        "diagonal": np.diagonal(ref),
        "tridiagonal": bands,
    }


# Half of the kinds (every one with `LINEAX_EXHAUSTIVE=1`): op by op, each
# operation of each kind compiles a program of its own.
@pytest.mark.parametrize("kind, dtype", sample(_rotating(KINDS, DTYPES)))
def test_eager_and_filter_jit(kind, dtype):
    """`test_operator_matches_matrix` computes under `jax.jit`; here the same,
    op by op, and `eqx.filter_jit` of the operator itself."""
    op, ref = _fixed_operator(kind, dtype, tags=(psd,) if kind == "tagged" else ())
    rng = np.random.default_rng(1)
    x = random_vector(rng, op.in_structure())
    w = random_vector(rng, op.out_structure())
    params, fn = _operator_functions(op)
    assert_close(fn(params, x, w), _expected(ref, x, w), dtype, scale=10)
    # `eqx.filter_jit` takes the operator itself (its functions are static).
    mv = eqx.filter_jit(lambda op, x: op.mv(x))(op, x)
    assert_close(flatten(mv), ref @ flatten(x), dtype, scale=10)
    # Predicates are static: available inside jit.
    expected_predicates = true_predicates(op)
    static = eqx.partition(op, eqx.is_array)[1]

    @jax.jit
    def traced(params):
        traced_op = eqx.combine(params, static)
        assert true_predicates(traced_op) == expected_predicates
        return lx.diagonal(traced_op)

    assert_close(traced(params), np.diagonal(ref), dtype, scale=10)


# The other half of the kinds (every one with `LINEAX_EXHAUSTIVE=1`): each batching
# of each kind compiles a program of its own.
@pytest.mark.parametrize("kind, dtype", sample(_rotating(KINDS, DTYPES), 1))
def test_vmap(kind, dtype):
    ops, refs = zip(*[_fixed_operator(kind, dtype, seed) for seed in (0, 1)])
    rng = np.random.default_rng(2)
    xs = [random_vector(rng, ops[0].in_structure()) for _ in range(2)]
    ws = [random_vector(rng, ops[0].out_structure()) for _ in range(2)]
    x_batch = jtu.tree_map(lambda *a: jnp.stack(a), *xs)
    w_batch = jtu.tree_map(lambda *a: jnp.stack(a), *ws)
    params0, fn = _operator_functions(ops[0])
    leaves, treedef = jtu.tree_flatten(params0)
    batched_leaves = [
        jnp.stack([a, b])
        for a, b in zip(leaves, jtu.tree_leaves(eqx.filter(ops[1], eqx.is_array)))
    ]
    params_batch = jtu.tree_unflatten(treedef, batched_leaves)

    def item(tree, i):
        return jtu.tree_map(lambda a: a[i], tree)

    # Over the vectors.
    out = jax.jit(jax.vmap(fn, in_axes=(None, 0, 0)))(params0, x_batch, w_batch)
    for i in range(2):
        expected = _expected(refs[0], xs[i], ws[i])
        assert_close(item(out, i), expected, dtype, scale=10)
    # Over the operator's arrays (the identity has none).
    if batched_leaves:
        vmapped = jax.vmap(fn, in_axes=(0, None, None))
        out = jax.jit(vmapped)(params_batch, xs[0], ws[0])
        for i in range(2):
            expected = _expected(refs[i], xs[0], ws[0])
            assert_close(item(out, i), expected, dtype, scale=10)
        # Both at once, of `mv` only, op by op.
        mv = jax.vmap(lambda p, x: flatten_jax(eqx.combine(p, ops[0]).mv(x)))
        mv = mv(params_batch, x_batch)
        for i in range(2):
            assert_close(mv[i], refs[i] @ flatten(xs[i]), dtype, scale=10)


@pytest.mark.parametrize("kind, dtype", _rotating(KINDS, (f64, c128)))
def test_jvp(kind, dtype):
    """`jax.jvp` of `mv` with respect to the operator's arrays and the vector,
    against central differences (exact for the at most cubic dependence here)."""
    op, _ = _fixed_operator(kind, dtype)
    rng = np.random.default_rng(3)
    x = random_vector(rng, op.in_structure())
    dx = random_vector(rng, op.in_structure())
    params, static = eqx.partition(op, eqx.is_inexact_array)
    dparams = jtu.tree_map(lambda p: jnp.asarray(randn_like(rng, p), p.dtype), params)
    if kind in NO_JVP_KINDS:
        # A `custom_vjp` function has no JVP rule: only the vector is perturbed.
        dparams = jtu.tree_map(jnp.zeros_like, params)

    def mv(params, x):
        return flatten_jax(eqx.combine(params, static).mv(x))

    if kind in NO_JVP_KINDS:
        _, tangent = jax.jvp(lambda x: mv(params, x), (x,), (dx,))
    else:
        _, tangent = jax.jvp(mv, (params, x), (dparams, dx))
    h = 1e-4

    def shifted(sign):
        p = jtu.tree_map(lambda a, d: a + sign * h * d, params, dparams)
        v = jtu.tree_map(lambda a, d: a + sign * h * d, x, dx)
        return np.asarray(mv(p, v))

    finite_difference = (shifted(1) - shifted(-1)) / (2 * h)
    np.testing.assert_allclose(tangent, finite_difference, rtol=1e-6, atol=1e-6)
    # And of `as_matrix` under jit, against the matrix of the tangent operator.
    if kind not in NO_JVP_KINDS:
        as_matrix = lambda p: eqx.combine(p, static).as_matrix()
        _, dmatrix = jax.jit(ft.partial(jax.jvp, as_matrix))((params,), (dparams,))
        if not jtu.tree_leaves(params):
            return  # (Known bug, see `test_tangent_of_constant_operator`.)
        tangent_op = lx.TangentLinearOperator(op, dparams)
        assert_close(tangent_op.as_matrix(), dmatrix, dtype)
        assert_close(flatten(tangent_op.mv(x)), np.asarray(dmatrix) @ flatten(x), dtype)


def test_tangent_tridiagonal_of_diagonal():
    d = lx.DiagonalLinearOperator(jnp.ones(3))
    bands = lx.tridiagonal(lx.TangentLinearOperator(d, d))
    assert_close(list(bands), [np.ones(3), np.zeros(2), np.zeros(2)], f64)


def test_tangent_of_constant_operator():
    i = lx.IdentityLinearOperator(flat_structure(2, f64))
    tangent = lx.TangentLinearOperator(i, i)
    assert_close(tangent.mv(jnp.ones(2)), np.zeros(2), f64)
    assert_close(tangent.as_matrix(), np.zeros((2, 2)), f64)


#
# Arithmetic.
#

_ARITH_KINDS = ("matrix", "pytree", "function", "jacobian", "tagged", "diagonal")


@_examples(6)
@hypothesis.given(
    kinds=st.tuples(*[st.sampled_from(_ARITH_KINDS)] * 3),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_arithmetic_matches_matrices(kinds, dtype, seed, data):
    in_s = data.draw(structures(dtype))
    if "matrix" in kinds or "diagonal" in kinds:
        in_s = flat_structure(3, dtype)
    mid_s = in_s if "diagonal" in kinds else data.draw(structures(dtype))
    if "matrix" in kinds:
        mid_s = flat_structure(3, dtype)
    a, ra = random_operator(kinds[0], dtype, mid_s, mid_s, (), seed)
    b, rb = random_operator(kinds[1], dtype, in_s, mid_s, (), seed + 1)
    c, rc = random_operator(kinds[2], dtype, mid_s, mid_s, (), seed + 2)
    s = jnp.asarray(-1.25, dtype)
    rs = round_to(s, dtype)
    cases = {
        "add": (a + c, ra + rc),
        "sub": (a - c, ra - rc),
        "compose": (a @ b, ra @ rb),
        "compose3": (c @ a @ b, rc @ ra @ rb),
        "mul": (a * s, ra * rs),
        "rmul": (s * a, rs * ra),
        "div": (a / s, ra / rs),
        "neg": (-a, -ra),
        "mixed": ((a + c) @ b * s - (-(a @ b)), (ra + rc) @ rb * rs + ra @ rb),
    }
    x = random_vector(np.random.default_rng(seed), b.in_structure())
    classes = {
        "add": lx.AddLinearOperator,
        "sub": lx.AddLinearOperator,
        "compose": lx.ComposedLinearOperator,
        "mul": lx.MulLinearOperator,
        "rmul": lx.MulLinearOperator,
        "div": lx.DivLinearOperator,
        "neg": lx.NegLinearOperator,
    }
    for name, (op, ref) in cases.items():
        if name in classes:
            assert type(op) is classes[name]
        scale = max(1.0, float(np.abs(ref).max()))
        assert_close(op.as_matrix(), ref, dtype, scale)
        assert_close(op.T.as_matrix(), ref.T, dtype, scale)
        if name in ("compose", "compose3", "mixed"):
            vec = x
        else:
            vec = random_vector(np.random.default_rng(0), op.in_structure())
        assert_close(flatten(op.mv(vec)), ref @ flatten(vec), dtype, scale)


def test_python_scalar_stays_static():
    op = lx.MatrixLinearOperator(jnp.eye(2), psd)
    for scaled in (op * 2.0, 2.0 * op, op / 2.0):
        assert isinstance(scaled, (lx.MulLinearOperator, lx.DivLinearOperator))
        assert type(scaled.scalar) is float
        assert lx.is_positive_semidefinite(scaled)
    assert_close((op * 2.0).as_matrix(), 2 * np.eye(2), f64)
    assert_close((op / 2.0).as_matrix(), np.eye(2) / 2, f64)
    assert lx.is_negative_semidefinite(op * -2.0)
    assert not lx.is_positive_semidefinite(op * -2.0)
    assert lx.is_negative_semidefinite(op / -2.0)
    assert_close(
        lx.MulLinearOperator(op, jnp.array(3.0)).as_matrix(), 3 * np.eye(2), f64
    )


def test_client_pattern_op_plus_scaled_identity():
    # Optimistix builds `op + scalar * IdentityLinearOperator(...)`.
    structure = {
        "a": jax.ShapeDtypeStruct((2,), f64),
        "b": jax.ShapeDtypeStruct((), f64),
    }
    op, ref = random_operator("pytree", f64, structure, structure, (psd,))
    damped = op + jnp.array(0.5) * lx.IdentityLinearOperator(op.in_structure())
    assert_close(damped.as_matrix(), ref + 0.5 * np.eye(3), f64)
    assert lx.is_symmetric(damped)
    assert not lx.is_positive_semidefinite(damped)  # traced scalar: sign unknown
    assert lx.is_positive_semidefinite(op + 0.5 * lx.IdentityLinearOperator(structure))


@pytest.mark.parametrize(
    "out_dtype",
    [
        f64,
        pytest.param(f32),
    ],
)
def test_identity_between_structures(out_dtype):
    in_s = {"a": jax.ShapeDtypeStruct((2, 2), f64), "b": jax.ShapeDtypeStruct((), f64)}
    out_s = (jax.ShapeDtypeStruct((5,), out_dtype),)
    op = lx.IdentityLinearOperator(in_s, out_s)
    x = random_vector(np.random.default_rng(0), in_s)
    y = op.mv(x)
    assert same_structure(jax.eval_shape(lambda: y), out_s)
    assert_close(flatten(y), flatten(x), out_dtype)
    assert same_structure(op.T.in_structure(), out_s)
    assert op.as_matrix().shape == (5, 5)
    assert_close(lx.diagonal(op), np.ones(5), f64)
    assert same_structure(lx.IdentityLinearOperator(in_s).out_structure(), in_s)


#
# Bad construction input.
#


def _pytree_op(pytree, out=None):
    return lambda: lx.PyTreeLinearOperator(
        pytree, out or jax.ShapeDtypeStruct((2,), f64)
    )


def _jac_fn(x, args):
    return x


# Wrong-typed arguments on purpose (each `pyright: ignore` marks one).
CONSTRUCTION_ERRORS = {
    "add_in_structure": (lambda: _mat(n=3) + _mat(n=2), ValueError, "structure"),
    "add_dtype": (lambda: _mat(dtype=f64) + _mat(dtype=f32), ValueError, "structure"),
    "add_function_structure": (lambda: _fun() + _pyt(), ValueError, "structure"),
    "add_not_operator": (
        lambda: lx.AddLinearOperator(_mat(), jnp.eye(3)),  # pyright: ignore[reportArgumentType]
        TypeError,
        "operator2",
    ),
    "compose_structure": (lambda: _mat(n=3) @ _mat(n=2), ValueError, "operator1"),
    "compose_not_operator": (
        lambda: lx.ComposedLinearOperator(jnp.eye(3), _mat()),  # pyright: ignore[reportArgumentType]
        TypeError,
        "operator1",
    ),
    "matrix_1d": (lambda: lx.MatrixLinearOperator(jnp.ones(3)), ValueError, "matrix"),
    "matrix_3d": (
        lambda: lx.MatrixLinearOperator(jnp.ones((2, 2, 2))),
        ValueError,
        "matrix",
    ),
    "matrix_string": (lambda: lx.MatrixLinearOperator("abc"), TypeError, "matrix"),
    "tridiagonal_lower": (
        lambda: lx.TridiagonalLinearOperator(jnp.ones(3), jnp.ones(3), jnp.ones(2)),
        ValueError,
        "lower_diagonal",
    ),
    "tridiagonal_upper": (
        lambda: lx.TridiagonalLinearOperator(jnp.ones(3), jnp.ones(2), jnp.ones(1)),
        ValueError,
        "upper_diagonal",
    ),
    "tridiagonal_2d": (
        lambda: lx.TridiagonalLinearOperator(
            jnp.ones((3, 1)), jnp.ones(2), jnp.ones(2)
        ),
        ValueError,
        "diagonal",
    ),
    "jac_unknown": (
        lambda: lx.JacobianLinearOperator(_jac_fn, jnp.ones(2), jac="rev"),  # pyright: ignore[reportArgumentType]
        ValueError,
        "jac",
    ),
    "jac_x_not_array": (
        lambda: lx.JacobianLinearOperator(_jac_fn, ["a", "b"]),
        TypeError,
        "`x`",
    ),
    "pytree_leaf_shape": (_pytree_op(jnp.ones((3, 2))), ValueError, "pytree"),
    "pytree_leaf_rank": (_pytree_op(jnp.ones(())), ValueError, "pytree"),
    "pytree_input_mismatch": (
        _pytree_op(
            (jnp.ones((2, 3)), jnp.ones((2, 4))),
            (jax.ShapeDtypeStruct((2,), f64), jax.ShapeDtypeStruct((2,), f64)),
        ),
        ValueError,
        "pytree",
    ),
    "pytree_tree_mismatch": (
        _pytree_op({"a": jnp.ones((2, 3))}, (jax.ShapeDtypeStruct((2,), f64),)),
        ValueError,
        "pytree",
    ),
    "pytree_leaf_string": (_pytree_op("abc"), TypeError, "pytree"),
    "pytree_leaf_object": (_pytree_op(object()), TypeError, "pytree"),
    "pytree_output_structure": (
        lambda: lx.PyTreeLinearOperator(jnp.ones((2, 2)), "abc"),
        TypeError,
        "output_structure",
    ),
    "diagonal_leaf_string": (
        lambda: lx.DiagonalLinearOperator(["abc"]),
        TypeError,
        "diagonal",
    ),
    "function_not_callable": (
        lambda: lx.FunctionLinearOperator(jnp.ones(2), _S),  # pyright: ignore[reportArgumentType]
        TypeError,
        "fn",
    ),
    "function_bad_structure": (
        lambda: lx.FunctionLinearOperator(lambda x: x, ["abc"]),
        TypeError,
        "input_structure",
    ),
    "function_wrong_structure": (
        lambda: lx.FunctionLinearOperator(lambda x: jnp.ones((2, 2)) @ x, _S),
        ValueError,
        "input_structure",
    ),
    "identity_bad_structure": (
        lambda: lx.IdentityLinearOperator("abc"),
        TypeError,
        "input_structure",
    ),
    "tagged_not_operator": (
        lambda: lx.TaggedLinearOperator(jnp.eye(2), sym),  # pyright: ignore[reportArgumentType]
        TypeError,
        "operator",
    ),
    "mul_not_scalar": (lambda: _mat() * jnp.ones(3), ValueError, "scalar"),
    "mul_operator": (lambda: _mat() * _mat(), TypeError, "@"),  # pyright: ignore[reportOperatorIssue]
    "div_not_scalar": (lambda: _mat() / jnp.ones((1, 1)), ValueError, "scalar"),
    "neg_not_operator": (
        lambda: lx.NegLinearOperator(jnp.eye(2)),  # pyright: ignore[reportArgumentType]
        TypeError,
        "operator",
    ),
    "tangent_structure": (
        lambda: lx.TangentLinearOperator(_mat(), _pyt()),
        ValueError,
        "tangent",
    ),
    "tangent_not_operator": (
        lambda: lx.TangentLinearOperator(jnp.eye(2), _mat()),  # pyright: ignore[reportArgumentType]
        TypeError,
        "primal",
    ),
}


@pytest.mark.parametrize("name", list(CONSTRUCTION_ERRORS))
def test_construction_errors(name):
    thunk, error, match = CONSTRUCTION_ERRORS[name]
    with raises_message(error, match):
        thunk()


def test_operator_arithmetic_with_non_operators():
    op = _mat()
    with pytest.raises(TypeError):
        op + jnp.eye(3)  # pyright: ignore[reportOperatorIssue, reportUnusedExpression]
    with pytest.raises(TypeError):
        op @ jnp.eye(3)  # pyright: ignore[reportOperatorIssue, reportUnusedExpression]


def test_reads_every_leaf_and_holds_values_are_declared_per_operator():
    # Declared beside each operator class: a stored operator's action reads every
    # array it holds (so the finiteness test may examine those arrays), a closure
    # may hold arrays it never reads; neither question looks at values.
    from lineax._operator.base import (
        has_cheap_diagonal,
        holds_values,
        reads_every_leaf as reads,
    )

    matrix = lx.MatrixLinearOperator(jnp.eye(3))
    struct = jax.ShapeDtypeStruct((3,), matrix.matrix.dtype)
    function = lx.FunctionLinearOperator(lambda x: 2 * x, struct)
    stacked = lx.BlockDiagonalLinearOperator([matrix, matrix])
    pair = lx.BlockDiagonalLinearOperator(
        [matrix, lx.DiagonalLinearOperator(jnp.ones(2))]
    )
    for operator, expected in (
        (matrix, True),
        (lx.DiagonalLinearOperator(jnp.ones(3)), True),
        (lx.TaggedLinearOperator(matrix, lx.symmetric_tag), True),
        (2.0 * matrix + (-matrix), True),
        (matrix @ matrix, True),
        (stacked, True),
        (pair, True),
        (lx.ChebyshevPreconditioner(matrix, 2, (0.5, 2.0)), True),
        (function, False),
        (matrix + function, False),
        (lx.BlockDiagonalLinearOperator([matrix, function]), False),
        (lx.NeumannPreconditioner(function, 2, 0.5), False),
    ):
        assert reads(operator) is expected, operator
    assert holds_values(matrix) and holds_values(-matrix)
    assert not holds_values(function)
    assert holds_values(lx.TaggedLinearOperator(function, lx.diagonal_tag))
    assert not has_cheap_diagonal(function) and has_cheap_diagonal(matrix)
