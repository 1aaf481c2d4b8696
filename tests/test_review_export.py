"""An adversarial review of solves under JAX's program-level machinery and Python's
object machinery, as research code and libraries use them, against the same solve
under `jax.jit`, NumPy in float64 and lineax 0.1.1 (run as an oracle outside the
test suite).

Reviewed, and found to agree (no test here): `jax.export` with `throw=False`
of LU, Cholesky, SVD, Diagonal, Tridiagonal, Auto, CG, GMRES, BiCGStab and
LSMR (bitwise against `jit`), serialised and deserialised, their gradients
(`vjp_order=1`), for several platforms at once, and over a symbolic batch
dimension of `vmap`; AOT `jit(...).lower(...).compile()` and
`eqx.filter_jit(...).lower`; `jax.eval_shape`/`eqx.filter_eval_shape` of
solves and of `lx.invert(op).mv` (no product of the operator made, no error
raised for a singular one); `jax.checkpoint`/`eqx.filter_checkpoint` with
`nothing_saveable`, `dots_saveable` and `everything_saveable`, under `grad`,
`hessian`, second derivatives through a checkpointed `lax.scan` body (one
factorisation per solve in the compiled program); `pickle`, `copy`, `deepcopy`
and `eqx.tree_serialise_leaves` of operators, preconditioners, solvers,
`Solution`s and states (a deserialised LU state reused with `state=`, also
under `jit` and in an exported function); `hash`/`eqx.tree_equal` of solvers;
`repr` (bounded, no array printed); `named_scope`, `ensure_compile_time_eval`,
`jax.debug.callback` and `jax.checkpoint` in a function operator;
`lax.switch`/`lax.cond` between solvers and operators, `lax.map`,
`fori_loop`, `vmap` with `axis_name`/`spmd_axis_name` and over `y0`,
preconditioners and states. Each test here failed before the fix it protects.
"""

import re

import jax
import numpy as np
import pytest
from jax import export

import lineax as lx


_RNG = np.random.default_rng(0)
_N = 5
_A = _RNG.normal(size=(_N, _N)) + _N * np.eye(_N)
_SPD = _A @ _A.T
_B = _RNG.normal(size=_N)
_PSD = lx.positive_semidefinite_tag


def _solve_fn(solver, tags=(), throw=False):
    def solve(matrix, vector):
        operator = lx.MatrixLinearOperator(matrix, tags)
        return lx.linear_solve(operator, vector, solver, throw=throw).value

    return jax.jit(solve)


@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)], ids=str)
def test_qr_solve_can_be_exported(shape, complex_):
    # QR applied `Q` with LAPACK's `ormqr`, a custom call without JAX's
    # compatibility guarantee: `jax.export` refused every QR solve ("Cannot
    # serialize code with custom calls whose targets have no compatibility
    # guarantees"), and so every `AutoLinearSolver` solve of a non-square
    # operator. The exported program applies the reflectors in StableHLO; the
    # program under `jit` still calls `ormqr`.
    rng = np.random.default_rng(1)
    matrix = rng.normal(size=shape)
    vector = rng.normal(size=shape[0])
    if complex_:
        matrix = matrix + 1j * rng.normal(size=shape)
        vector = vector + 1j * rng.normal(size=shape[0])
    solve = _solve_fn(lx.QR())
    exported = export.export(solve)(matrix, vector)
    assert "mqr_ffi" not in exported.mlir_module()
    assert "mqr_ffi" in solve.lower(matrix, vector).as_text()
    expected = np.linalg.lstsq(matrix, vector, rcond=None)[0]
    np.testing.assert_allclose(exported.call(matrix, vector), expected, atol=1e-13)
    # Many factorisations (the reflectors batched) and one factorisation for
    # many right-hand sides (the batch moved into columns).
    matrices = np.stack([matrix, 2 * matrix])
    vectors = np.stack([vector, vector + 1])
    for in_axes, args in [(0, (matrices, vectors)), ((None, 0), (matrix, vectors))]:
        batched = jax.jit(jax.vmap(solve, in_axes=in_axes))
        out = export.export(batched)(*args).call(*args)
        np.testing.assert_allclose(out, batched(*args), atol=1e-13)


def test_auto_solve_of_a_tall_operator_can_be_exported_and_differentiated():
    matrix = _RNG.normal(size=(6, 3))
    vector = _RNG.normal(size=6)
    solve = _solve_fn(lx.AutoLinearSolver(well_posed=None))
    exported = export.export(solve)(matrix, vector)
    weights = np.arange(3.0)
    grad = jax.grad(lambda m: exported.call(m, vector) @ weights)(matrix)
    expected = jax.grad(lambda m: solve(m, vector) @ weights)(matrix)
    np.testing.assert_allclose(grad, expected, atol=1e-13)


def test_export_of_a_throwing_solve_says_to_pass_throw_false():
    # JAX's own error named no solve: "serialization of host_callbacks is not
    # yet implemented".
    with pytest.raises(ValueError, match="throw=False"):
        export.export(_solve_fn(lx.LU(), throw=True))(_A, _B)


_SYMBOLIC_CASES = {
    "LU": (_A, (), lx.LU()),
    "Cholesky": (_SPD, _PSD, lx.Cholesky()),
    "SVD": (_A, (), lx.SVD()),
    "Diagonal": (np.diag(np.diag(_A)), lx.diagonal_tag, lx.Diagonal()),
    "Auto": (_A, (), lx.AutoLinearSolver(well_posed=True)),
    "CG": (_SPD, _PSD, lx.CG(rtol=1e-12, atol=1e-12, max_steps=50)),
    # (A basis longer than the problem: `restart` 20 > 5 at run time.)
    "GMRES": (_A, (), lx.GMRES(rtol=1e-12, atol=1e-12, max_steps=50)),
    "BiCGStab": (_A, (), lx.BiCGStab(rtol=1e-12, atol=1e-12, max_steps=50)),
    "LSMR": (_A, (), lx.LSMR(rtol=1e-12, atol=1e-12, max_steps=50)),
}


@pytest.mark.parametrize("name", list(_SYMBOLIC_CASES))
def test_export_with_a_symbolic_size(name):
    # `jax.export.symbolic_shape("n")` for the operator's size, as lineax 0.1.1
    # exports LU, Cholesky, SVD, Diagonal, Auto, CG and BiCGStab: every solve
    # failed deep in lineax, in `int(np.prod(shape))` of the structures' sizes
    # ("Symbolic dimension 'n' used in a context that requires a constant"),
    # then in the condition estimate's choice of method by size.
    matrix, tags, solver = _SYMBOLIC_CASES[name]
    (n,) = export.symbolic_shape("n")
    solve = _solve_fn(solver, tags)
    exported = export.export(solve)(
        jax.ShapeDtypeStruct((n, n), matrix.dtype), jax.ShapeDtypeStruct((n,), _B.dtype)
    )
    for size in (_N, 2):
        m, b = matrix[:size, :size], _B[:size]
        out = exported.call(m, b)
        np.testing.assert_allclose(out, np.linalg.solve(m, b), atol=1e-10)
        if size == _N:
            np.testing.assert_allclose(out, solve(m, b), atol=1e-13)


def _tridiagonal_solve(diagonal, vector):
    operator = lx.TridiagonalLinearOperator(diagonal + 3, diagonal[1:], diagonal[:-1])
    return lx.linear_solve(operator, vector, throw=False).value


def _pytree_solve(matrix, vector):
    structure = {"a": jax.ShapeDtypeStruct(vector.shape, vector.dtype)}
    operator = lx.PyTreeLinearOperator({"a": {"a": matrix}}, structure)
    return lx.linear_solve(operator, {"a": vector}, lx.LU(), throw=False).value["a"]


def test_export_with_a_symbolic_size_of_tridiagonal_and_pytree_operators():
    # The tridiagonal solve chose a dense LU by `n <= 2`, and the PyTree
    # operator's matrix was reshaped to `int(np.prod(shape))`: both inconclusive
    # for a symbolic `n` (lineax 0.1.1 exports the tridiagonal one).
    (n,) = export.symbolic_shape("n")
    struct = jax.ShapeDtypeStruct
    diagonal = np.arange(1.0, _N + 1)
    tridiagonal = export.export(jax.jit(_tridiagonal_solve))(
        struct((n,), diagonal.dtype), struct((n,), _B.dtype)
    )
    dense = (
        np.diag(diagonal + 3) + np.diag(diagonal[1:], -1) + np.diag(diagonal[:-1], 1)
    )
    expected = np.linalg.solve(dense, _B)
    np.testing.assert_allclose(tridiagonal.call(diagonal, _B), expected)
    pytree = export.export(jax.jit(_pytree_solve))(
        struct((n, n), _A.dtype), struct((n,), _B.dtype)
    )
    np.testing.assert_allclose(pytree.call(_A, _B), np.linalg.solve(_A, _B))


def test_stats_of_a_symbolic_size_solve_estimate_the_condition_number():
    # The estimate for a size known only at run time (Hager's, whatever the size).
    (n,) = export.symbolic_shape("n")

    def rcond(matrix, vector):
        sol = lx.linear_solve(lx.MatrixLinearOperator(matrix), vector, throw=False)
        return sol.stats["rcond"]

    exported = export.export(jax.jit(rcond))(
        jax.ShapeDtypeStruct((n, n), _A.dtype), jax.ShapeDtypeStruct((n,), _B.dtype)
    )
    expected = 1 / np.linalg.cond(_A, 1)
    estimate = exported.call(_A, _B)
    assert expected <= estimate <= 3 * expected


@pytest.mark.parametrize("solver", [lx.CG, lx.BiCGStab], ids=["CG", "BiCGStab"])
def test_symbolic_size_with_default_max_steps_is_a_clear_error(solver):
    (n,) = export.symbolic_shape("n")
    solve = _solve_fn(solver(rtol=1e-8, atol=1e-8), _PSD)
    with pytest.raises(ValueError, match="explicit `max_steps`"):
        export.export(solve)(
            jax.ShapeDtypeStruct((n, n), _SPD.dtype),
            jax.ShapeDtypeStruct((n,), _B.dtype),
        )


def _host_operator(matrix, tags):
    """A matrix-free operator computed in NumPy on the host, which JAX cannot
    transpose."""

    def mv(x):
        return jax.pure_callback(
            lambda x: np.asarray(matrix @ np.asarray(x)),
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            x,
            vmap_method="sequential",
        )

    return lx.FunctionLinearOperator(mv, jax.ShapeDtypeStruct((_N,), _B.dtype), tags)


@pytest.mark.parametrize(
    "solver",
    [lx.LSMR(rtol=1e-12, atol=1e-12), lx.Normal(lx.CG(rtol=1e-12, atol=1e-12))],
    ids=["LSMR", "Normal"],
)
def test_solve_of_a_host_callback_operator_tagged_definite(solver):
    # Tagged positive semidefinite (so symmetric), its transpose is itself; only
    # `symmetric_tag` was read, so LSMR and `Normal`, which apply the transpose,
    # called `jax.linear_transpose` on the callback: "Pure callbacks do not
    # support transpose". lineax 0.1.1 solves it.
    operator = _host_operator(_SPD, _PSD)
    expected = np.linalg.solve(_SPD, _B)
    np.testing.assert_allclose(lx.linear_solve(operator, _B, solver).value, expected)
    vectors = np.stack([_B, -2 * _B])
    # (Compiled once: run op by op, the batched solve compiles each operation of
    # its loop's body, and traces the same path.)
    batched = jax.jit(jax.vmap(lambda b: lx.linear_solve(operator, b, solver).value))(
        vectors
    )
    np.testing.assert_allclose(batched, np.linalg.solve(_SPD, vectors.T).T)


@pytest.mark.parametrize(
    "solver", [lx.CG(rtol=1e-12, atol=1e-12), lx.LU()], ids=["CG", "LU"]
)
def test_gradient_of_a_solve_of_a_host_callback_operator_tagged_definite(solver):
    # The reverse-mode solve transposes the operator: the same failure.
    operator = _host_operator(_SPD, _PSD)
    weights = np.arange(1.0, _N + 1)
    grad = jax.grad(lambda b: lx.linear_solve(operator, b, solver).value @ weights)
    np.testing.assert_allclose(grad(_B), np.linalg.solve(_SPD, weights), atol=1e-13)


def test_exported_qr_products_ask_for_full_precision():
    # The reflector loop that replaces `ormqr` in an exported program is lowered
    # only for export, out of reach of the jaxpr walk of `test_review_gpu.py`:
    # its products asked for default precision, TF32 on a GPU (a 10-bit
    # mantissa) for a float32 solve.
    matrix = _RNG.normal(size=(6, 4)).astype(np.float32)
    vector = _RNG.normal(size=6).astype(np.float32)
    text = export.export(_solve_fn(lx.QR()))(matrix, vector).mlir_module()
    products = re.findall(r"stablehlo\.dot_general.*", text)
    assert products
    for product in products:
        assert "precision = [HIGHEST, HIGHEST]" in product, product
