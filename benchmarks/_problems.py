"""Test problems: random dense matrices and matrix-free stencil operators.

All data is generated with NumPy from fixed seeds, so every run (and both
libraries within a run) sees the same numbers.
"""

import numpy as np


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def dense_matrix(n: int, seed: int) -> np.ndarray:
    """A well-conditioned nonsymmetric square matrix."""
    a = rng(seed).standard_normal((n, n)) / np.sqrt(n)
    return a + 2.0 * np.eye(n)


def spd_matrix(n: int, seed: int) -> np.ndarray:
    """A well-conditioned symmetric positive definite matrix."""
    a = rng(seed).standard_normal((n, n)) / np.sqrt(n)
    return a @ a.T + np.eye(n)


def tall_matrix(m: int, n: int, seed: int) -> np.ndarray:
    return rng(seed).standard_normal((m, n)) / np.sqrt(m)


def vector(n: int, seed: int, batch: tuple[int, ...] = ()) -> np.ndarray:
    return rng(seed).standard_normal(batch + (n,))


def tridiagonal(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Diagonally dominant tridiagonal matrix: (diagonal, lower, upper)."""
    r = rng(seed)
    lower = r.uniform(-1.0, 1.0, n - 1)
    upper = r.uniform(-1.0, 1.0, n - 1)
    diag = 3.0 + r.uniform(0.0, 1.0, n)
    return diag, lower, upper


SHIFT = 0.05  # the "+ 0.05 I" that keeps the Poisson operator definite
CONVECTION = 1.0  # upwind convection velocity (x direction), grid units


def stencil_mv(xp, N: int, convection: float, shift: float = SHIFT):
    """The matrix-free operator `x -> A x` on an N x N grid, written for either
    NumPy or jax.numpy (`xp`).

    A = 5-point Laplacian (Dirichlet, unscaled: 4 on the diagonal, -1 to each
    neighbour) + shift * I (default SHIFT), plus, when `convection != 0`, a
    first-order upwind convection term `c (u[i, j] - u[i, j - 1])`, which makes A
    non-symmetric.
    """

    def mv(x):
        u = x.reshape(N, N)
        p = xp.pad(u, 1)
        up, down = p[:-2, 1:-1], p[2:, 1:-1]
        left, right = p[1:-1, :-2], p[1:-1, 2:]
        out = (4.0 + shift) * u - up - down - left - right
        if convection != 0.0:
            out = out + convection * (u - left)
        return out.reshape(N * N)

    return mv


def true_relative_residual(
    N: int, convection: float, x, b, shift: float = SHIFT
) -> float:
    """||b - A x||_2 / ||b||_2, evaluated in float64 with NumPy."""
    mv = stencil_mv(np, N, convection, shift)
    x = np.asarray(x, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(b - mv(x)) / np.linalg.norm(b))


def conditioned_tall_matrix(m: int, n: int, cond: float, seed: int) -> np.ndarray:
    """An m x n matrix with singular values spaced logarithmically from 1 to
    1 / cond, and random singular vectors."""
    r = rng(seed)
    left, _ = np.linalg.qr(r.normal(size=(m, n)))
    right, _ = np.linalg.qr(r.normal(size=(n, n)))
    return (left * np.logspace(0, -np.log10(cond), n)) @ right.T


def normal_equations_residual(A, x, b) -> float:
    """||A^T (b - A x)||_2 / (||A||_F ||b - A x||_2), in float64 with NumPy: the
    least-squares optimality of x (LSMR's second stopping test)."""
    A = np.asarray(A, np.float64)
    r = np.asarray(b, np.float64) - A @ np.asarray(x, np.float64)
    return float(np.linalg.norm(A.T @ r) / (np.linalg.norm(A) * np.linalg.norm(r)))
