"""Every matrix product lineax makes asks for full precision.

On a GPU, XLA computes a float32 `dot_general` of default precision in TF32
(a 10-bit mantissa) on recent NVIDIA chips: a Krylov solver's Givens rotations
or a verification product made that way cannot reach a float32 tolerance. What
the GPU does cannot be run here, but what lineax asks for can be read from the
lowered program: every `dot_general` of a solve, its JVP and its VJP must carry
`Precision.HIGHEST`. (Found by the GPU run of the test suite: GMRES applied its
rotations with `@`.)
"""

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx


def _products(text: str) -> list[str]:
    """The matrix products of a lowered (StableHLO) program."""
    return [
        line.strip()
        for line in text.splitlines()
        if re.search(r"stablehlo\.dot(_general)?\b", line)
    ]


_RNG = np.random.default_rng(0)
_A = _RNG.normal(size=(6, 6)).astype(np.float32)
_SPD = _A @ _A.T + 6 * np.eye(6, dtype=np.float32)
_TALL = _RNG.normal(size=(8, 6)).astype(np.float32)
_B6 = _RNG.normal(size=6).astype(np.float32)
_B8 = _RNG.normal(size=8).astype(np.float32)

_CASES = {
    "LU": (_A, (), lx.LU(), _B6),
    "QR": (_TALL, (), lx.QR(), _B8),
    "SVD": (_TALL, (), lx.SVD(), _B8),
    "Cholesky": (_SPD, lx.positive_semidefinite_tag, lx.Cholesky(), _B6),
    "CG": (_SPD, lx.positive_semidefinite_tag, lx.CG(1e-5, 1e-5), _B6),
    "MINRES": (_SPD, lx.symmetric_tag, lx.MINRES(1e-5, 1e-5), _B6),
    "GMRES": (_A, (), lx.GMRES(1e-5, 1e-5, restart=4), _B6),
    "BiCGStab": (_A, (), lx.BiCGStab(1e-5, 1e-5), _B6),
    "LSMR": (_TALL, (), lx.LSMR(1e-5, 1e-5), _B8),
    "Normal": (_TALL, (), lx.Normal(lx.Cholesky()), _B8),
}


@pytest.mark.parametrize("name", list(_CASES))
def test_every_product_of_a_solve_asks_for_full_precision(name):
    matrix, tags, solver, b = _CASES[name]

    def loss(matrix, b):
        operator = lx.MatrixLinearOperator(matrix, tags)
        x = lx.linear_solve(operator, b, solver, throw=False).value
        return jnp.sum(x**2)

    # The solve, its JVP (through `grad`'s linearisation) and its VJP, as lowered
    # (the jaxpr shows the solve as one primitive).
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(matrix, b).as_text()
    products = _products(text)
    assert products, "no product found: the search of the program is broken"
    low = [p for p in products if "precision = [HIGHEST, HIGHEST]" not in p]
    assert not low, f"{len(low)} of {len(products)} products not HIGHEST: {low}"


def _structured_operators() -> dict[str, Any]:
    m = [lx.MatrixLinearOperator(jnp.asarray(_A[:3, :3] + k)) for k in range(3)]
    u = jnp.asarray(_TALL[:6, :2])
    return {
        "block_diagonal": lx.BlockDiagonalLinearOperator(m),
        "kronecker": lx.KroneckerLinearOperator(m[0], m[1]),
        "low_rank": lx.LowRankUpdateLinearOperator(
            lx.MatrixLinearOperator(jnp.asarray(_A)),
            u,
            jnp.eye(2, dtype=jnp.float32),
            u.T,
        ),
    }


@pytest.mark.parametrize("name", ["block_diagonal", "kronecker", "low_rank"])
def test_every_product_of_a_structured_operator_asks_for_full_precision(name):
    operator = _structured_operators()[name]
    vector = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), operator.in_structure())

    def both(operator, vector):
        return operator.mv(vector), operator.as_matrix()

    text = jax.jit(both).lower(operator, vector).as_text()
    low = [p for p in _products(text) if "precision = [HIGHEST, HIGHEST]" not in p]
    assert not low, f"products not HIGHEST: {low}"


def test_a_reused_trace_follows_the_configuration_in_context():
    # lineax caches its traces of `solver.compute` per structure: a trace made
    # outside `jax.default_matmul_precision("highest")` must not be reused inside
    # it (the key holds JAX's trace context, as JAX's own caches do).
    matrix = jnp.asarray(_SPD)
    operator = lx.FunctionLinearOperator(
        lambda x: matrix @ x,
        jax.ShapeDtypeStruct((6,), jnp.float32),
        lx.positive_semidefinite_tag,
        closure_convert=False,  # (traced at each solve, not once when built)
    )

    def solve(b):
        return lx.linear_solve(operator, b, lx.CG(1e-5, 1e-5), throw=False).value

    b = jnp.asarray(_B6)
    default = _products(jax.jit(solve).lower(b).as_text())
    with jax.default_matmul_precision("highest"):
        highest = _products(jax.jit(solve).lower(b).as_text())
    assert any("HIGHEST, HIGHEST" not in p for p in default)  # the user's product
    assert all("HIGHEST, HIGHEST" in p for p in highest)
