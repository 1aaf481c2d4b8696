"""Writing your own operator and your own solver — and differentiating through both.

The operator: a circulant matrix C (each row a cyclic shift of the one above),
stored by its first column c, applied with FFTs in O(n log n).

The solver: circulant matrices are diagonalised by the discrete Fourier
transform, so Cx = b is solved by x = ifft(fft(b) / fft(c)).

Neither class contains any derivative code: `linear_solve` differentiates
through them using only `mv`/`transpose` (operator) and `compute`/`transpose`/
`assume_full_rank` (solver).
"""

from typing import Any

import equinox as eqx
import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Complex, Inexact

import lineax as lx


class Circulant(lx.AbstractLinearOperator):
    """The n x n circulant matrix C[i, j] = column[(i - j) mod n]."""

    column: Inexact[Array, " n"]

    def mv(self, vector):
        # C is a circular convolution with `column`; convolution is a product in
        # Fourier space.
        out = jnp.fft.ifft(jnp.fft.fft(self.column) * jnp.fft.fft(vector))
        if jnp.iscomplexobj(self.column) or jnp.iscomplexobj(vector):
            return out
        return out.real

    def as_matrix(self):
        n = self.column.shape[0]
        index = (jnp.arange(n)[:, None] - jnp.arange(n)[None, :]) % n
        return self.column[index]

    def transpose(self):
        # C^T[i, j] = column[(j - i) mod n]: again circulant, with the column
        # read backwards from index 0.
        return Circulant(jnp.roll(self.column[::-1], 1))

    def in_structure(self):
        return jax.ShapeDtypeStruct(self.column.shape, self.column.dtype)

    def out_structure(self):
        return jax.ShapeDtypeStruct(self.column.shape, self.column.dtype)


class CirculantState(eqx.Module):
    """The eigenvalues fft(column) of a circulant operator."""

    eigenvalues: Complex[Array, " n"]
    real: bool = eqx.field(static=True)


def _reflect(eigenvalues):
    # eigenvalues[-j mod n]: the spectrum of the transposed circulant.
    return jnp.roll(eigenvalues[::-1], 1)


class CirculantSolver(lx.AbstractLinearSolver[CirculantState]):
    """Solves circulant systems with two FFTs. Any operator whose matrix is
    circulant is accepted (its first column defines it)."""

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        if operator.in_size() != operator.out_size():
            raise ValueError("CirculantSolver needs a square operator.")
        if isinstance(operator, Circulant):
            column = operator.column
        else:
            column = operator.as_matrix()[:, 0]
        return CirculantState(jnp.fft.fft(column), not jnp.iscomplexobj(column))

    def compute(self, state: CirculantState, vector, options: dict[str, Any]):
        solution = jnp.fft.ifft(jnp.fft.fft(vector) / state.eigenvalues)
        if state.real and not jnp.iscomplexobj(vector):
            solution = solution.real
        nonsingular = jnp.all(state.eigenvalues != 0)
        result = lx.RESULTS.where(
            nonsingular, lx.RESULTS.successful, lx.RESULTS.singular
        )
        return solution, result, {}

    def transpose(self, state: CirculantState, options: dict[str, Any]):
        return CirculantState(_reflect(state.eigenvalues), state.real), options

    def conj(self, state: CirculantState, options: dict[str, Any]):
        return CirculantState(
            jnp.conj(_reflect(state.eigenvalues)), state.real
        ), options

    def assume_full_rank(self):
        # We only handle nonsingular systems, so the JVP rule may use the cheap
        # well-posed formula (equation (4) of the paper).
        return True


key_c, key_b = jr.split(jr.key(4))
n = 8
column = jr.normal(key_c, (n,)) + jnp.zeros(n).at[0].set(4.0)  # diagonally dominant
b = jr.normal(key_b, (n,))
operator = Circulant(column)
dense = operator.as_matrix()

print("mv matches the dense matrix:", bool(jnp.allclose(operator.mv(b), dense @ b)))
print("transpose matches:", bool(jnp.allclose(operator.T.as_matrix(), dense.T)))

x_ours = lx.linear_solve(operator, b, CirculantSolver()).value
x_ref = jnp.linalg.solve(dense, b)


def error(x):
    return f"max |x - jnp.linalg.solve| = {jnp.max(jnp.abs(x - x_ref)):.1e}"


print("our operator + our solver  :", error(x_ours))
for name, solver in [("LU", lx.LU()), ("GMRES", lx.GMRES(rtol=1e-12, atol=1e-12))]:
    x = lx.linear_solve(operator, b, solver).value
    print(f"our operator + lineax {name:5s}:", error(x))
x = lx.linear_solve(lx.MatrixLinearOperator(dense), b, CirculantSolver()).value
print("lineax matrix + our solver :", error(x))


# Gradients with respect to the operator's parameters and the right-hand side,
# in reverse mode (uses `transpose`) and forward mode.
def loss(column, b):
    x = lx.linear_solve(Circulant(column), b, CirculantSolver()).value
    return jnp.sum(jnp.sin(x))


def loss_dense(column, b):
    return jnp.sum(jnp.sin(jnp.linalg.solve(Circulant(column).as_matrix(), b)))


g = jax.jit(jax.grad(loss, argnums=(0, 1)))(column, b)
r = jax.grad(loss_dense, argnums=(0, 1))(column, b)
print(
    f"reverse mode vs dense: d/dcolumn {jnp.max(jnp.abs(g[0] - r[0])):.1e},",
    f"d/db {jnp.max(jnp.abs(g[1] - r[1])):.1e}",
)
tangent = jnp.ones(n)
_, t = jax.jvp(lambda c: loss(c, b), (column,), (tangent,))
_, t_ref = jax.jvp(lambda c: loss_dense(c, b), (column,), (tangent,))
print(f"forward mode vs dense: {abs(float(t - t_ref)):.1e}")

# And under vmap, over a batch of operators.
columns = column + 0.1 * jnp.arange(3.0)[:, None]
xs = jax.vmap(lambda c: lx.linear_solve(Circulant(c), b, CirculantSolver()).value)(
    columns
)
print("vmap over 3 operators, solutions shape:", xs.shape)
