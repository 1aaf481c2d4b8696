"""Conjugate gradients on a badly scaled SPD matrix, with and without a Jacobi
(diagonal) preconditioner.

The preconditioner is passed through `options={"preconditioner": P}`, where P is
a positive definite operator approximating A⁻¹ — here P = diag(A)⁻¹, tagged
positive semidefinite so that CG accepts it.

If matplotlib is installed, the residual against the iteration count is saved
as a PNG (path: the first command-line argument, default
`preconditioned_krylov.png` in a temporary folder, never the working
directory). The curves come from `solution.stats["residual_history"]` of the one
solve each: CG's residual estimate after every step (zero after the last).
"""

import os
import sys
import tempfile

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np

import lineax as lx


rng = np.random.default_rng(5)
n = 100
# A = D M D with M a well-conditioned SPD matrix and D spanning two orders of
# magnitude: A is badly conditioned, much less so after Jacobi scaling.
q, _ = np.linalg.qr(rng.normal(size=(n, n)))
m = q @ np.diag(np.linspace(1.0, 10.0, n)) @ q.T
scale = np.logspace(0, 2, n)
matrix = jnp.asarray(scale[:, None] * m * scale[None, :])
b = jnp.asarray(rng.normal(size=n))

operator = lx.MatrixLinearOperator(
    matrix, (lx.symmetric_tag, lx.positive_semidefinite_tag)
)
jacobi = lx.TaggedLinearOperator(
    lx.DiagonalLinearOperator(1 / jnp.diag(matrix)), lx.positive_semidefinite_tag
)
scaled = np.asarray(matrix / jnp.diag(matrix)[:, None])
print(
    f"cond(A) = {np.linalg.cond(np.asarray(matrix)):.1e},",
    f"cond(diag(A)^-1 A) = {np.linalg.cond(scaled):.1e}",
)

rtol = atol = 1e-8
reference = np.linalg.solve(np.asarray(matrix), np.asarray(b))
runs = {"no preconditioner": {}, "Jacobi preconditioner": {"preconditioner": jacobi}}
steps = {}
histories = {}
for label, options in runs.items():
    solution = lx.linear_solve(
        operator, b, lx.CG(rtol=rtol, atol=atol), options=options
    )
    steps[label] = int(solution.stats["num_steps"])
    histories[label] = np.asarray(solution.stats["residual_history"])
    error = np.max(np.abs(np.asarray(solution.value) - reference)) / np.max(
        np.abs(reference)
    )
    print(f"CG, {label:22s}: {steps[label]:4d} steps, relative error {error:.1e}")


try:
    import matplotlib
except ImportError:
    print(
        "matplotlib is not installed: skipping the residual plot "
        "(pip install matplotlib to get it)."
    )
else:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in runs:
        # The history is the residual estimate in the solver's norm (here the
        # max norm), after each step; zero after the last step.
        history = histories[label][: steps[label]]
        ks = np.arange(1, steps[label] + 1)
        relative = history / float(jnp.max(jnp.abs(b)))
        ax.semilogy(ks, relative, "-", label=f"{label} ({steps[label]} steps)")
    ax.set_xlabel("CG iteration")
    ax.set_ylabel(r"$\|r_k\|_\infty / \|b\|_\infty$ (CG's estimate)")
    ax.set_title(f"CG on a badly scaled SPD matrix (n={n})")
    ax.legend()
    fig.tight_layout()
    if len(sys.argv) > 1:
        path = sys.argv[1]
    else:
        path = os.path.join(tempfile.mkdtemp(), "preconditioned_krylov.png")
    fig.savefig(path, dpi=100)
    print("saved the residual plot to", path)
