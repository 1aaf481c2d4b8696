"""`lineax.internal` (norms, dtype helpers, packing) and the public names of the
operator layer."""

import inspect
import os
import pkgutil
import types

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from helpers import (
    assert_close,
    backend_compiles,
    DelegatingLU,
    flatten,
    flatten_jax,
    randn_like,
    random_operator,
    random_vector,
    recorded_jax_only,
    same_structure,
    tolerance,
)

import lineax as lx
import lineax.internal as lxi


f32, f64, c128 = jnp.float32, jnp.float64, jnp.complex128


#
# lineax.internal.
#


@pytest.mark.parametrize("dtype", [f32, f64, c128])
def test_norms(dtype):
    rng = np.random.default_rng(0)
    tree = {
        "a": jnp.asarray(randn_like(rng, np.zeros((2, 3), dtype)), dtype),
        "b": jnp.ones((), dtype),
    }
    flat = flatten(tree)
    tol = tolerance(dtype)
    np.testing.assert_allclose(lxi.max_norm(tree), np.abs(flat).max(), rtol=tol)
    np.testing.assert_allclose(lxi.two_norm(tree), np.linalg.norm(flat), rtol=tol)
    np.testing.assert_allclose(
        lxi.rms_norm(tree), np.linalg.norm(flat) / np.sqrt(7), rtol=tol
    )
    np.testing.assert_allclose(
        lxi.sum_squares(tree), np.sum(np.abs(flat) ** 2), rtol=tol
    )
    for norm in (lxi.max_norm, lxi.two_norm, lxi.rms_norm, lxi.sum_squares):
        out = norm(tree)
        assert out.shape == ()
        assert not jnp.iscomplexobj(out)
        assert norm(jtu.tree_map(jnp.zeros_like, tree)) == 0


@pytest.mark.parametrize(
    "dtype, big",
    [(f64, 1e200), (f32, 1e30), (c128, 1e200)],
)
def test_two_norm_no_overflow(dtype, big):
    x = jnp.full((4,), big, dtype)
    expected = 2 * big
    assert np.isclose(float(lxi.two_norm(x)), expected, rtol=1e-5)
    assert np.isclose(float(lxi.rms_norm(x)), big, rtol=1e-5)
    assert np.isclose(float(lxi.two_norm((x, x))), expected * np.sqrt(2), rtol=1e-5)
    tiny = jnp.full((4,), 1e-30 if dtype == f32 else 1e-200, dtype)
    assert float(lxi.two_norm(tiny)) > 0


def test_norm_gradients():
    for norm in (lxi.two_norm, lxi.rms_norm):
        grad = jax.grad(norm)(jnp.zeros(3))
        assert np.all(np.isfinite(grad)) and np.all(grad == 0)
    x = jnp.array([3.0, 4.0])
    np.testing.assert_allclose(jax.grad(lxi.two_norm)(x), x / 5, rtol=1e-12)
    np.testing.assert_allclose(jax.grad(lxi.two_norm)({"a": x})["a"], x / 5, rtol=1e-12)
    assert np.all(np.isfinite(jax.jit(jax.grad(lxi.two_norm))(jnp.zeros(2))))


def test_norm_gradient_complex():
    grad = jax.grad(lambda x: lxi.two_norm(x.astype(c128) * 1j))(jnp.zeros(2))
    assert np.all(grad == 0)
    np.testing.assert_allclose(lxi.two_norm(jnp.array([3j, 4.0 + 0j])), 5.0)


def test_tree_dot():
    a = {"x": jnp.array([1 + 2j, 3j]), "y": jnp.array(2.0 + 0j)}
    b = {"x": jnp.array([1j, 1.0 + 0j]), "y": jnp.array(1j)}
    expected = np.vdot(flatten(a), flatten(b))
    np.testing.assert_allclose(lxi.tree_dot(a, b), expected)
    np.testing.assert_allclose(lxi.tree_dot(b, a), np.conj(expected))
    np.testing.assert_allclose(lxi.tree_dot(a, a), np.sum(np.abs(flatten(a)) ** 2))
    real = jnp.arange(3.0)
    assert float(lxi.tree_dot(real, real)) == 5.0
    assert float(lxi.tree_dot((real,), (2 * real,))) == 10.0


# A mixed-dtype PyTree (the vector of a PyTree operator mixing float32 and float64
# leaves): the norms and inner products promote as NumPy would, also under strict
# dtype promotion (the suite's setting), where they raised a TypePromotionError.
def test_norms_of_mixed_dtype_pytree():
    assert jax.config.jax_numpy_dtype_promotion == "strict"  # pyright: ignore
    x = (jnp.array([3.0], jnp.float32), jnp.array([-4.0, 0.0], jnp.float64))
    for norm, expected in [
        (lxi.max_norm, 4.0),
        (lxi.two_norm, 5.0),
        (lxi.rms_norm, 5.0 / np.sqrt(3)),
        (lxi.sum_squares, 25.0),
        (lambda y: lxi.tree_dot(y, y), 25.0),
    ]:
        out = norm(x)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_internal_signatures():
    for name in ("max_norm", "two_norm", "rms_norm", "sum_squares"):
        assert list(inspect.signature(getattr(lxi, name)).parameters) == ["x"]
    assert len(inspect.signature(lxi.tree_dot).parameters) == 2


def test_dtype_helpers():
    assert lxi.default_floating_dtype() == jnp.float64  # conftest enables x64
    with jax.enable_x64(False):
        assert lxi.default_floating_dtype() == jnp.float32
    assert lxi.complex_to_real_dtype(jnp.complex128) == jnp.float64
    assert lxi.complex_to_real_dtype(jnp.complex64) == jnp.float32
    assert lxi.complex_to_real_dtype(jnp.float32) == jnp.float32
    assert lxi.complex_to_real_dtype(jnp.dtype("complex128")) == jnp.float64
    assert lxi.complex_to_real_dtype(jnp.ones(2, jnp.complex64)) == jnp.float32
    assert lxi.complex_to_real_dtype(np.ones(2, np.complex128)) == jnp.float64


@pytest.mark.parametrize("kind", ["matrix", "pytree", "function", "identity"])
def test_packing_roundtrip(kind):
    in_s = {"a": jax.ShapeDtypeStruct((2, 2), f64), "b": jax.ShapeDtypeStruct((), f64)}
    out_s = (jax.ShapeDtypeStruct((3,), f64), jax.ShapeDtypeStruct((1, 2), f64))
    op, ref = random_operator(kind, f64, in_s, out_s)
    packed = lxi.pack_structures(op)
    assert isinstance(packed, lxi.PackedStructures)
    rng = np.random.default_rng(0)
    b = random_vector(rng, op.out_structure())
    flat_b = lxi.ravel_vector(b, packed)
    assert flat_b.shape == (op.out_size(),)
    assert_close(flat_b, flatten(b), f64)
    x = random_vector(rng, op.in_structure())
    unravelled = lxi.unravel_solution(flatten_jax(x), packed)
    assert same_structure(jax.eval_shape(lambda: unravelled), op.in_structure())
    assert_close(unravelled, x, f64)
    # The flat order is that of `as_matrix`.
    assert_close(
        op.as_matrix() @ lxi.ravel_vector(x, lxi.pack_structures(op.T)),
        ref @ flatten(x),
        f64,
    )
    transposed = lxi.transpose_packed_structures(packed)
    assert same_structure(transposed.in_structure, op.out_structure())
    assert same_structure(transposed.out_structure, op.in_structure())
    roundtrip = lxi.unravel_solution(lxi.ravel_vector(b, packed), transposed)
    assert_close(roundtrip, b, f64)
    # Usable as static data under jit.
    jitted = jax.jit(lambda v: lxi.unravel_solution(v, packed))(flatten_jax(x))
    assert_close(jitted, x, f64)


#
# Public names.
#

# From the public API contract: the operator, tag, function and `lineax.internal`
# names (solver names come with the solve layer).
OPERATOR_LAYER_NAMES = """
AbstractLinearOperator AddLinearOperator ComposedLinearOperator
DiagonalLinearOperator DivLinearOperator FunctionLinearOperator
IdentityLinearOperator JacobianLinearOperator MatrixLinearOperator
MulLinearOperator NegLinearOperator PyTreeLinearOperator TaggedLinearOperator
TangentLinearOperator TridiagonalLinearOperator conj diagonal diagonal_tag
has_unit_diagonal is_diagonal is_lower_triangular is_negative_semidefinite
is_positive_semidefinite is_symmetric is_tridiagonal is_upper_triangular
linearise lower_triangular_tag materialise negative_semidefinite_tag
positive_semidefinite_tag symmetric_tag transpose_tags transpose_tags_rules
tridiagonal tridiagonal_tag unit_diagonal_tag upper_triangular_tag
""".split()
INTERNAL_NAMES = """
PackedStructures complex_to_real_dtype default_floating_dtype linear_solve_p
max_norm pack_structures ravel_vector rms_norm sum_squares
transpose_packed_structures tree_dot two_norm
""".split()


@pytest.mark.parametrize("name", OPERATOR_LAYER_NAMES)
def test_public_names(name):
    assert hasattr(lx, name)
    value = getattr(lx, name)
    if name.endswith("LinearOperator"):
        assert issubclass(value, lx.AbstractLinearOperator)
        assert issubclass(value, eqx.Module)


_FUNCTION_NAMES = [
    n for n in OPERATOR_LAYER_NAMES if n[0].islower() and "_tag" not in n
]


@pytest.mark.parametrize("name", _FUNCTION_NAMES)
def test_public_functions_are_functions(name):
    # E.g. a submodule `lineax._operator.diagonal` would shadow the function
    # `lineax.diagonal` if imported after it.
    value = getattr(lx, name)
    assert not isinstance(value, types.ModuleType)
    assert callable(value) or name == "transpose_tags_rules"


def test_no_operator_module_is_named_like_a_public_function():
    # The operator modules are named after their classes (`diagonal_operator.py`),
    # so none shadows a function of the same name, whatever the import order.
    import lineax._operator

    modules = {m.name for m in pkgutil.iter_modules(lineax._operator.__path__)}
    assert modules.isdisjoint(_FUNCTION_NAMES)


@pytest.mark.parametrize("name", INTERNAL_NAMES)
def test_internal_names(name):
    assert hasattr(lxi, name)


def test_constructor_signatures():
    def params(cls):
        return list(inspect.signature(cls).parameters)

    assert params(lx.MatrixLinearOperator) == ["matrix", "tags"]
    assert params(lx.PyTreeLinearOperator) == ["pytree", "output_structure", "tags"]
    assert params(lx.DiagonalLinearOperator) == ["diagonal"]
    assert params(lx.TridiagonalLinearOperator) == [
        "diagonal",
        "lower_diagonal",
        "upper_diagonal",
    ]
    assert params(lx.IdentityLinearOperator) == ["input_structure", "output_structure"]
    assert params(lx.FunctionLinearOperator) == [
        "fn",
        "input_structure",
        "tags",
        "closure_convert",
    ]
    assert params(lx.JacobianLinearOperator) == [
        "fn",
        "x",
        "args",
        "tags",
        "jac",
        "closure_convert",
    ]
    assert params(lx.TaggedLinearOperator) == ["operator", "tags"]
    assert params(lx.AddLinearOperator) == ["operator1", "operator2"]
    assert params(lx.ComposedLinearOperator) == ["operator1", "operator2"]
    assert params(lx.MulLinearOperator) == ["operator", "scalar"]
    assert params(lx.DivLinearOperator) == ["operator", "scalar"]
    assert params(lx.NegLinearOperator) == ["operator"]
    assert params(lx.TangentLinearOperator) == ["primal", "tangent"]
    sig = inspect.signature(lx.JacobianLinearOperator)
    assert sig.parameters["jac"].default is None
    assert sig.parameters["closure_convert"].default is True
    assert sig.parameters["args"].default is None
    assert inspect.signature(lx.MatrixLinearOperator).parameters["tags"].default == ()
    pytree_op = lx.PyTreeLinearOperator(
        jnp.ones((2, 3)), jax.ShapeDtypeStruct((2,), f64)
    )
    assert pytree_op.pytree.shape == (2, 3)


def test_tree_all_finite_small_complex_and_folded_arrays():
    # Small arrays are summed broadcast to a larger shape, complex ones as their
    # real plus imaginary parts, and a vector is folded into a matrix by
    # multiplication: each must still see every non-finite entry, and no
    # overflow of finite ones (the largest finite values of the dtype).
    from lineax._misc import tree_all_finite

    check = jax.jit(tree_all_finite)
    for dtype in (jnp.float32, jnp.float64, jnp.complex64, jnp.complex128):
        big = np.finfo(dtype).max
        for n in (1, 3, 100, 5000):
            x = np.full(n, big, dtype)
            assert bool(check(x))
            assert bool(check((np.full((n, 2), -big, dtype), x[:2])))
            for bad in (np.inf, -np.inf, np.nan, 1j * np.inf, 1j * np.nan):
                if np.iscomplexobj(bad) and not jnp.issubdtype(
                    dtype, jnp.complexfloating
                ):
                    continue
                y = x.copy()
                y[n // 2] = bad
                assert not bool(check(y)), (dtype, n, bad)
                # Folded into a matrix, as the solution of a dense solve is.
                matrix = np.full((n, n) if n < 200 else (2, n), big, dtype)
                assert not bool(check((matrix, y)))
                matrix[-1, 0] = bad
                assert not bool(check((matrix, x)))


def test_tree_finite_index_is_zero_exactly_when_finite_and_never_negative():
    # The index on which a dense solve's error branch is chosen (`throw=True`):
    # the bits of a sum of absolute values. Zero for a finite tree, whatever the
    # signs (the products of a negative solution with the matrix's zeros are
    # -0.0, whose bits are not zero); positive for any non-finite entry (a NaN
    # made by `inf - inf` has its sign bit set on x86, which would be a negative
    # index, and lose to zero in the largest over a batch).
    from lineax._misc import tree_finite_test

    def index(tree):
        finite, index = tree_finite_test(tree, index=True)
        assert index is not None
        return finite, index

    check = jax.jit(index)
    for dtype in (jnp.float32, jnp.complex64):
        big = np.finfo(dtype).max
        for n in (3, 100, 5000):
            x = np.full(n, -big, dtype)
            matrix = np.full((n, n) if n < 200 else (2, n), -big, dtype)
            for tree in (x, (matrix, x)):
                finite, bits = check(tree)
                assert bool(finite) and int(bits) == 0
            for bad in (np.inf, -np.inf, np.nan, -np.nan):
                y = x.copy()
                y[n // 2] = bad
                bad_matrix = matrix.copy()
                bad_matrix[-1, 0] = bad
                for tree in (y, (matrix, y), (bad_matrix, x)):
                    finite, bits = check(tree)
                    assert not bool(finite) and int(bits) > 0, (dtype, n, bad)
            # Under `vmap` over the vectors, folded into one matrix.
            ys = np.stack([x, x, x])
            ys[1, 0] = np.nan
            _, bits = jax.vmap(index, in_axes=((None, 0),))((matrix, ys))
            assert list(np.asarray(bits) > 0) == [False, True, False]
    # Not one float32 reduction: no index (the code is then made as before).
    assert tree_finite_test(jnp.ones(3, jnp.float64), index=True)[1] is None
    two = (jnp.ones(3, jnp.float32), jnp.ones(2, jnp.float32))
    assert tree_finite_test(two, index=True)[1] is None


class _CountingLU(DelegatingLU):
    """`LU`, counting the traces of `compute`."""

    def compute(self, state, vector, options):
        _COMPUTE_TRACES.append(jnp.result_type(vector))
        return lx.LU().compute(state, vector, options)


_COMPUTE_TRACES: list = []


def test_solver_compute_traced_once_per_structure():
    # The primitive's abstract evaluation and its lowering share one trace of
    # `solver.compute` per solver and structure, shapes and dtypes of its
    # inputs: a new function of the same solve (a new closure, a new `jit`)
    # traces it again only where the shapes or dtypes differ.
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((4, 4)) + 4 * np.eye(4)
    vector = rng.standard_normal(4)

    def solve(dtype):
        def f(a, b):
            return lx.linear_solve(lx.MatrixLinearOperator(a), b, _CountingLU()).value

        a, b = jnp.asarray(matrix, dtype), jnp.asarray(vector, dtype)
        return jax.jit(f)(a, b)

    jax.clear_caches()
    _COMPUTE_TRACES.clear()
    first = solve(jnp.float64)
    traced = len(_COMPUTE_TRACES)
    # Once, not twice: the lowering evaluates the abstract evaluation's trace.
    assert traced == 1
    again = solve(jnp.float64)
    np.testing.assert_allclose(again, first)
    np.testing.assert_allclose(first, np.linalg.solve(matrix, vector), rtol=1e-12)
    # A new function of the same solve traces nothing again.
    assert len(_COMPUTE_TRACES) == traced
    single = solve(jnp.float32)
    assert single.dtype == jnp.float32
    assert jnp.dtype(jnp.float32) in _COMPUTE_TRACES
    np.testing.assert_allclose(single, first, rtol=1e-4)


def test_truncated_compilation_cache_entry_is_compiled_again():
    # The test run shares one JAX compilation cache between its pytest-xdist
    # workers (tests/conftest.py), and JAX writes an entry in place: one worker can
    # read the other's half-written entry. JAX then warns and compiles the program
    # itself; the run must take that as a cache miss, not fail (a CI run once failed
    # collecting tests/test_operators.py this way). Simulated here by truncating
    # this test's own entry.
    cache_dir = os.environ.get("LINEAX_TEST_COMPILATION_CACHE")
    if not cache_dir:
        pytest.skip("the run's compilation cache is off")

    def f(x):
        return x * 3.25 + 17.0

    x = jnp.arange(7.0)
    before = set(os.listdir(cache_dir))
    expected = jax.jit(f)(x)
    written = [n for n in set(os.listdir(cache_dir)) - before if n.endswith("-cache")]
    assert written, "the program was not written to the cache"
    for name in written:
        path = os.path.join(cache_dir, name)
        with open(path, "rb") as file:
            data = file.read()
        with open(path, "wb") as file:
            file.write(data[: len(data) // 2])
    jax.clear_caches()
    np.testing.assert_array_equal(jax.jit(f)(x), expected)


def test_programs_served_by_the_compilation_cache_count_as_compiles():
    # The tests that count XLA compiles (`helpers.backend_compiles`, and the
    # `backend_compile` listeners of test_review_recompile.py) run under the run's
    # persistent compilation cache (tests/conftest.py), which serves a program
    # compiled again, identical to one compiled before (a new closure of the same
    # function: the recompiles those tests look for), from disk. JAX records its
    # `backend_compile` event around the cache lookup too, so that such a
    # recompile is still counted; were it recorded only for a compile made, those
    # tests could no longer fail.
    if not os.environ.get("LINEAX_TEST_COMPILATION_CACHE"):
        pytest.skip("the run's compilation cache is off")

    def new_function():
        return jax.jit(lambda x: x * 2.75 - 11.0)

    x = jnp.arange(5.0)
    expected = new_function()(x)  # compiled, and written to the cache
    hits = []

    def listener(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    jax.monitoring.register_event_listener(listener)
    try:
        value, compiles = backend_compiles(lambda: new_function()(x))
    finally:
        jax.monitoring.unregister_event_listener(listener)
    assert len(hits) == 1, "not served by the cache: this test checks nothing"
    assert len(compiles) == 1
    np.testing.assert_array_equal(value, expected)


@recorded_jax_only
def test_hypot_is_jnp_hypot_without_nested_wheres():
    # `_misc.hypot` replaces `jnp.hypot` in MINRES and LSMR (whose three nested
    # `jnp.where`s are functions of their own to lower): the same values under
    # `jit`, over magnitudes from subnormal to overflow, zeros, infinities, NaN.
    from lineax._misc import hypot

    rng = np.random.default_rng(0)
    special = [0.0, -0.0, 1.0, -3.0, np.inf, -np.inf, np.nan, 1e300, 1e-300, 5e-324]
    for dtype in (np.float32, np.float64):
        with np.errstate(over="ignore"):
            values = np.concatenate(
                [
                    np.array(special),
                    rng.normal(size=2000) * 10.0 ** rng.integers(-40, 40, 2000),
                ]
            ).astype(dtype)
        x, y = values[:, None], values[None, :]
        ours = np.asarray(jax.jit(hypot)(x, y))
        reference = np.asarray(jax.jit(jnp.hypot)(x, y))
        assert ours.dtype == reference.dtype
        np.testing.assert_array_equal(ours, reference)
