"""Regression tests from a review of GPU and TPU readiness, checked on the CPU by
reading the programs lineax builds (their jaxprs, walked through every sub-jaxpr
and into the implementation of each solve), since no GPU was lent.

On a GPU a float32 `dot_general` of default precision runs in TF32 (a 10-bit
mantissa) unless it asks for `HIGHEST`; float64 is slow on most GPUs and missing
on TPUs, so a float64 value made by lineax inside a float32 solve (x64 enabled,
as in these tests) is a defect; and a host callback on the success path of a
compiled solve stalls the device. Over a table of every public operator, solver
(direct, structured, Krylov, preconditioned, `Normal`, `Auto`) and
preconditioner, the primal solve, `grad` (its JVP and transpose), `jvp`, `vmap`,
`mv`, `transpose().mv` and `as_matrix()`: every product asks for `HIGHEST`, also
under a user's `jax.default_matmul_precision("bfloat16")` (the users' functions
here ask for `HIGHEST` themselves: theirs is their business), no float64 or
complex128 value appears, and the error callbacks of `throw=True` sit only in a
`cond` branch. Trace-only (`make_jaxpr`, no compiles).

What was found: a float64 select in every Krylov solve (the first pass's
tolerance factor, from two Python numbers) and on the success path of a direct
solve of a function or Jacobian operator (the recorded finiteness of its
matrix); a float64 `shift` (and its add) in `ILUPreconditioner` and
`IncompleteCholeskyPreconditioner`; float64 draws in
`JacobiPreconditioner(probes=...)` (JAX's `rademacher` draws float64 uniforms
under x64 whatever the dtype); Lanczos products of default precision in the
spectrum estimates of `ChebyshevPreconditioner`, `NeumannPreconditioner` and the
multigrid Chebyshev smoother.

Reviewed and found right (no test here): the same properties of the lowered
StableHLO of each solver's gradient, of a `vmap` over the operator, and of
`materialise`, `linearise`, `diagonal`, `tridiagonal`, `conj` and `invert` of
each operator; eager solves of arrays committed to a second device (values,
states and stats land there; only trace constants and a failed solve's result
code are uncommitted, on the default device, which JAX moves as needed); and the
benchmarks that a lent GPU runs (`benchmarks/gpu_check.sh`, dry-run here at CPU
scale). Only the user's own function, in a `FunctionLinearOperator` or
`JacobianLinearOperator`, and its transpose, keep the user's precision.
"""

import functools as ft
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.sparse as sp

import lineax as lx


_HIGHEST = jax.lax.Precision.HIGHEST
_WIDE = (np.dtype(np.float64), np.dtype(np.complex128))
_PRODUCTS = ("dot_general", "conv_general_dilated", "ragged_dot_general")
_CALLBACKS = ("pure_callback", "io_callback", "debug_callback", "callback")


class _Findings(eqx.Module):
    products: list[str]
    low: list[str]
    wide: list[str]
    callbacks: list[str]
    branch_callbacks: list[str]


def _is_wide(aval: Any) -> bool:
    dtype = getattr(aval, "dtype", None)
    if dtype is None or jnp.issubdtype(dtype, jax.dtypes.extended):
        return False  # (a PRNG key)
    return np.dtype(dtype) in _WIDE


def _struct(var: Any) -> jax.ShapeDtypeStruct:
    aval = var.aval
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def _solve_jaxpr(eqn: Any) -> jex.ClosedJaxpr | None:
    """The implementation of a `linear_solve` (or of its batched form), which the
    outer jaxpr shows as one primitive, traced at the equation's inputs."""
    impl = lx.internal.linear_solve_p.impl
    args = [_struct(v) for v in eqn.invars]
    if eqn.primitive is lx.internal.linear_solve_p:
        return jax.make_jaxpr(lambda *a: impl(*a, **eqn.params))(*args)
    if eqn.params.get("prim") is lx.internal.linear_solve_p:  # under `vmap`
        params = dict(eqn.params["params"])
        batched = jax.vmap(
            lambda *a: impl(*a, **params),
            in_axes=eqn.params["__batch_axes"],
            axis_size=eqn.params["__axis_size"],
        )
        return jax.make_jaxpr(batched)(*args)
    return None


def _sub_jaxprs(eqn: Any):
    for value in eqn.params.values():
        for x in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(x, jex.ClosedJaxpr):
                yield x.jaxpr, x.consts
            elif isinstance(x, jex.Jaxpr):
                yield x, ()


def _walk(jaxpr: Any, consts: Any, path: tuple[str, ...], found: _Findings) -> None:
    """Record the products, float64 values and host callbacks of `jaxpr` and of
    every jaxpr inside it (`cond` branches, `while`/`scan` bodies, `pjit`,
    `custom_jvp`/`custom_vjp` calls, and the solves' implementations)."""
    where = "/".join(path)
    found.wide.extend(f"constant in {where}" for c in consts if _is_wide(c))
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        here = f"{where}/{name}"
        if any(_is_wide(v.aval) for v in eqn.outvars):
            found.wide.append(f"{here}: {str(eqn)[:300]}")
        if name in _PRODUCTS:
            found.products.append(here)
            precision = eqn.params.get("precision")
            if not (
                isinstance(precision, tuple) and all(p == _HIGHEST for p in precision)
            ):
                found.low.append(f"{here}: {str(eqn)[:300]}")
        if name in _CALLBACKS or name == "lineax_raise_everywhere":
            (found.branch_callbacks if "cond" in path else found.callbacks).append(here)
        inner = _solve_jaxpr(eqn)
        if inner is not None:
            _walk(inner.jaxpr, inner.consts, (*path, name), found)
        for sub, sub_consts in _sub_jaxprs(eqn):
            _walk(sub, sub_consts, (*path, name), found)


def _findings(fn: Callable, *args: Any) -> _Findings:
    # (`filter_make_jaxpr`: the operators' Python numbers stay static, as
    # under `eqx.filter_jit`; `jax.jit` would make them float64 inputs.)
    closed = eqx.filter_make_jaxpr(fn)(*args)[0]
    found = _Findings([], [], [], [], [])
    _walk(closed.jaxpr, closed.consts, (), found)
    return found


def _check(fn: Callable, *args: Any, products: bool = True) -> _Findings:
    # Under a user's lower default precision: lineax's own products must keep
    # asking for HIGHEST.
    with jax.default_matmul_precision("bfloat16"):
        found = _findings(fn, *args)
    assert not found.low, f"products not HIGHEST: {found.low}"
    assert not found.wide, f"float64 values in a float32 program: {found.wide}"
    assert not found.callbacks, f"host callbacks outside a cond: {found.callbacks}"
    if products:
        assert found.products, "no product found: the walk of the program is broken"
    return found


#
# The table.
#

_N = 4
_RNG = np.random.default_rng(0)
_A = (_RNG.normal(size=(_N, _N)) + 4 * np.eye(_N)).astype(np.float32)
_SPD = (_A @ _A.T + _N * np.eye(_N)).astype(np.float32)
_B = _RNG.normal(size=_N).astype(np.float32)
_STRUCT = jax.ShapeDtypeStruct((_N,), jnp.float32)
_PSD = lx.positive_semidefinite_tag


def _matmul(a, x):
    return jnp.matmul(a, x, precision=_HIGHEST)


def _operators() -> dict[str, lx.AbstractLinearOperator]:
    a = jnp.asarray(_A)
    matrix = lx.MatrixLinearOperator(a)
    blocks = [
        [lx.MatrixLinearOperator(a[i : i + 2, j : j + 2]) for j in (0, 2)]
        for i in (0, 2)
    ]
    return {
        "matrix": matrix,
        "pytree": lx.PyTreeLinearOperator(a, _STRUCT),
        "function": lx.FunctionLinearOperator(ft.partial(_matmul, a), _STRUCT),
        "jacobian": lx.JacobianLinearOperator(
            lambda x, args: jnp.sin(x) + _matmul(args, x), jnp.ones(_N, jnp.float32), a
        ),
        "jacobian_bwd": lx.JacobianLinearOperator(
            lambda x, args: jnp.sin(x) + _matmul(args, x),
            jnp.ones(_N, jnp.float32),
            a,
            jac="bwd",
        ),
        "diagonal": lx.DiagonalLinearOperator(
            jnp.arange(1.0, _N + 1, dtype=jnp.float32)
        ),
        "tridiagonal": lx.TridiagonalLinearOperator(
            jnp.full(_N, 4.0, jnp.float32),
            jnp.ones(_N - 1, jnp.float32),
            jnp.ones(_N - 1, jnp.float32),
        ),
        "identity": lx.IdentityLinearOperator(_STRUCT),
        "tagged": lx.TaggedLinearOperator(matrix, lx.symmetric_tag),
        "arithmetic": 2.0
        * (matrix + lx.IdentityLinearOperator(_STRUCT))
        @ -matrix
        / 3.0,
        "block": lx.BlockLinearOperator(blocks),
        "block_diagonal": lx.BlockDiagonalLinearOperator([blocks[0][0], blocks[1][1]]),
        "kronecker": lx.KroneckerLinearOperator(blocks[0][0], blocks[1][1]),
        "low_rank": lx.LowRankUpdateLinearOperator(
            matrix, a[:, :1], jnp.eye(1, dtype=jnp.float32), a[:1, :]
        ),
        "sparse": lx.SparseLinearOperator(sp.csr_matrix(_A)),
    }


_OPERATOR_NAMES = list(_operators())


def _ones(structure):
    return jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), structure)


@pytest.mark.parametrize("name", _OPERATOR_NAMES)
def test_operator_products_are_highest_and_float32(name):
    operator = _operators()[name]

    def run(operator):
        x, y = _ones(operator.in_structure()), _ones(operator.out_structure())

        def loss(y):
            # A Krylov solve (applies the operator in its loop) and a direct one
            # (materialises it), differentiated: JVP and transpose.
            gmres = lx.linear_solve(operator, y, lx.GMRES(1e-5, 1e-5)).value
            direct = lx.linear_solve(operator, y, throw=True).value
            return sum(jnp.sum(v) for v in jax.tree.leaves((gmres, direct)))

        return (
            operator.mv(x),
            operator.transpose().mv(y),
            operator.as_matrix(),
            jax.grad(loss)(y),
        )

    _check(run, operator)


def _solver_cases() -> dict[str, tuple[Callable, lx.AbstractLinearSolver]]:
    matrix = lambda m, tags=(): lx.MatrixLinearOperator(m, tags)  # noqa: E731
    psd = lambda m: matrix(_SPD + 0 * m, _PSD)  # noqa: E731
    tol = 1e-5

    def blocks(m):
        return [
            [lx.MatrixLinearOperator(m[i : i + 2, j : j + 2]) for j in (0, 2)]
            for i in (0, 2)
        ]

    return {
        "LU": (matrix, lx.LU()),
        "QR": (lambda m: matrix(jnp.concatenate([m, m])), lx.QR()),
        "SVD": (lambda m: matrix(m[:3]), lx.SVD(rcond=1e-3)),
        "Cholesky": (psd, lx.Cholesky()),
        "Triangular": (
            lambda m: matrix(jnp.tril(m), lx.lower_triangular_tag),
            lx.Triangular(),
        ),
        "Tridiagonal": (
            lambda m: lx.TridiagonalLinearOperator(m[0], m[1, 1:], m[2, 1:]),
            lx.Tridiagonal(),
        ),
        "Diagonal": (lambda m: lx.DiagonalLinearOperator(m[0]), lx.Diagonal(rcond=0.1)),
        "Auto": (matrix, lx.AutoLinearSolver(well_posed=None)),
        "CG": (psd, lx.CG(tol, tol)),
        "MINRES": (
            lambda m: matrix(_SPD + 0 * m, lx.symmetric_tag),
            lx.MINRES(tol, tol),
        ),
        "GMRES": (matrix, lx.GMRES(tol, tol, restart=3)),
        "FGMRES": (matrix, lx.FGMRES(tol, tol, restart=3)),
        "BiCGStab": (matrix, lx.BiCGStab(tol, tol)),
        "FlexibleCG": (psd, lx.FlexibleCG(tol, tol)),
        "PipelinedCG": (psd, lx.PipelinedCG(tol, tol)),
        "LSMR": (lambda m: matrix(m[:3]), lx.LSMR(tol, tol)),
        "Normal": (lambda m: matrix(jnp.concatenate([m, m])), lx.Normal(lx.Cholesky())),
        "NormalCG": (lambda m: matrix(m[:3]), lx.Normal(lx.CG(tol, tol))),
        "Kronecker": (
            lambda m: lx.KroneckerLinearOperator(*[b[0] for b in blocks(m)]),
            lx.Kronecker(),
        ),
        "BlockDiagonal": (
            lambda m: lx.BlockDiagonalLinearOperator(
                [blocks(m)[0][0], blocks(m)[1][1]]
            ),
            lx.BlockDiagonal(lx.GMRES(tol, tol)),
        ),
        "Schur": (lambda m: lx.BlockLinearOperator(blocks(m)), lx.Schur()),
        "Woodbury": (
            lambda m: lx.LowRankUpdateLinearOperator(
                matrix(m), m[:, :1], jnp.eye(1, dtype=m.dtype), m[:1, :]
            ),
            lx.Woodbury(),
        ),
    }


_SOLVER_CASES = _solver_cases()


# (complex64: a sample of the solvers.)
_SOLVER_DTYPES = [(name, jnp.float32) for name in _SOLVER_CASES] + [
    (name, jnp.complex64) for name in ("LU", "QR", "GMRES", "LSMR", "NormalCG")
]


@pytest.mark.parametrize("name, dtype", _SOLVER_DTYPES)
def test_solver_products_are_highest_and_float32(name, dtype):
    make, solver = _SOLVER_CASES[name]
    matrix = jnp.asarray(_A, dtype) + (
        1j * jnp.asarray(_A.T, dtype) if dtype == jnp.complex64 else 0
    )

    def solve(matrix, vector):
        operator = make(matrix)
        # (The right-hand side cut or repeated to the operator's output.)
        vector = jax.tree.map(
            lambda s: jnp.resize(vector, s.shape).astype(s.dtype),
            operator.out_structure(),
        )
        return lx.linear_solve(operator, vector, solver, throw=True).value

    def loss(matrix, vector):
        return sum(
            jnp.sum(jnp.abs(v) ** 2) for v in jax.tree.leaves(solve(matrix, vector))
        )

    def run(matrix, vector):
        return (
            # (Its linearisation is the JVP rule's: `jax.jvp` makes the same.)
            jax.grad(loss, argnums=(0, 1))(matrix, vector),
            jax.vmap(solve, in_axes=(None, 0))(matrix, jnp.stack([vector, vector])),
        )

    vector = jnp.asarray(_B, dtype)
    # (The diagonal and tridiagonal solves make no product; their derivatives'
    # products are the users' of `lx.TangentLinearOperator`, none here.)
    found = _check(
        run, matrix, vector, products=name not in ("Diagonal", "Tridiagonal")
    )
    assert found.branch_callbacks, "no error branch found: the walk is broken"


_PRECONDITIONERS = {
    "jacobi": lambda op: lx.JacobiPreconditioner(op),
    "jacobi_probes": lambda op: lx.JacobiPreconditioner(op, probes=3, key=jr.key(0)),
    "ssor": lambda op: lx.SSORPreconditioner(op),
    "block_jacobi": lambda op: lx.BlockJacobiPreconditioner(op, 2),
    "chebyshev": lambda op: lx.ChebyshevPreconditioner(op, 3, key=jr.key(0)),
    "neumann": lambda op: lx.NeumannPreconditioner(op, 3, key=jr.key(0)),
    # (Sparse factorisations of a pattern known when built: of the matrix as
    # data, not as a traced argument.)
    "ilu": lambda op: lx.ILUPreconditioner(
        lx.SparseLinearOperator(sp.csr_matrix(_SPD))
    ),
    "incomplete_cholesky": lambda op: lx.IncompleteCholeskyPreconditioner(
        lx.SparseLinearOperator(sp.csr_matrix(_SPD), _PSD)
    ),
    "inverse": lambda op: lx.invert(op, lx.CG(1e-2, 1e-2, max_steps=2)),
}


@pytest.mark.parametrize("name", list(_PRECONDITIONERS))
def test_preconditioner_products_are_highest_and_float32(name):
    def run(matrix, vector):
        # Built inside the trace: its construction (spectrum estimates,
        # factorisations, probes) is part of the program.
        operator = lx.MatrixLinearOperator(matrix, _PSD)
        preconditioner = _PRECONDITIONERS[name](operator)
        options = {"preconditioner": preconditioner}
        # (CG takes only a positive definite preconditioner; GMRES any.)
        tol = 1e-5
        solver = (
            lx.CG(tol, tol)
            if lx.is_positive_semidefinite(preconditioner)
            else lx.GMRES(tol, tol)
        )
        solution = lx.linear_solve(operator, vector, solver, options=options)
        fgmres = lx.linear_solve(operator, vector, lx.FGMRES(tol, tol), options=options)
        return solution.value, fgmres.value, preconditioner.as_matrix()

    _check(run, jnp.asarray(_SPD), jnp.asarray(_B))


def _laplacian(u, h):
    padded = jnp.pad(u, 1)
    neighbours = (
        padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    )
    return (4 * u - neighbours) / h**2


@pytest.mark.parametrize("smoother", ["jacobi", "chebyshev"])
def test_multigrid_products_are_highest_and_float32(smoother):
    def run(b):
        precond = lx.MultigridPreconditioner(
            _laplacian,
            (7, 7),
            0.1,
            dtype=jnp.float32,
            tags=_PSD,
            coarsest_size=9,
            smoother=smoother,
        )
        operator = lx.FunctionLinearOperator(
            lambda u: _laplacian(u, 0.1),
            jax.ShapeDtypeStruct((7, 7), jnp.float32),
            _PSD,
        )
        options = {"preconditioner": precond}
        return lx.linear_solve(operator, b, lx.CG(1e-5, 1e-5), options=options).value

    _check(run, jnp.ones((7, 7), jnp.float32))
