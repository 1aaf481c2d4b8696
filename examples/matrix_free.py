"""Matrix-free operators: solving with a function or a Jacobian, never forming a matrix.

* `FunctionLinearOperator(fn, input_structure)` wraps a linear function.
* `JacobianLinearOperator(fn, x, args)` is the Jacobian of a nonlinear `fn` at `x`,
  applied through JVPs (or VJPs with `jac="bwd"`).
Iterative solvers (CG, GMRES, BiCGStab, LSMR) only call `operator.mv`, so the
matrix is never built. PyTree inputs (here a dict) work too.
"""

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp

import lineax as lx


# --- 1. The 1D Poisson problem -u'' = f on (0, 1), u(0) = u(1) = 0 -----------
n = 100
h = 1.0 / (n + 1)
grid = jnp.linspace(h, 1 - h, n)


def neg_laplacian(u):
    # Second differences with zero boundary values: a linear function of u.
    padded = jnp.pad(u, 1)
    return (2 * padded[1:-1] - padded[:-2] - padded[2:]) / h**2


structure = jax.ShapeDtypeStruct((n,), jnp.float64)
# -d²/dx² is symmetric positive definite: say so with tags, so CG may be used.
poisson = lx.FunctionLinearOperator(
    neg_laplacian, structure, tags=(lx.symmetric_tag, lx.positive_semidefinite_tag)
)
# With f = 1 the exact solution is u = x(1 - x)/2, which second differences
# reproduce exactly: the only error left is that of the linear solve.
forcing = jnp.ones(n)
solution = lx.linear_solve(poisson, forcing, lx.CG(rtol=1e-12, atol=1e-12))
error = jnp.max(jnp.abs(solution.value - grid * (1 - grid) / 2))
print(
    f"Poisson, n={n}: CG took {int(solution.stats['num_steps'])} steps,",
    f"max error vs x(1 - x)/2 = {error:.1e}",
)


# --- 2. PyTree-valued unknowns: a coupled system in a dict ------------------
def coupled(x):
    return {"a": 3.0 * x["a"] + x["b"][0], "b": x["b"] * 2.0 + x["a"]}


in_structure = {
    "a": jax.ShapeDtypeStruct((), jnp.float64),
    "b": jax.ShapeDtypeStruct((2,), jnp.float64),
}
coupled_op = lx.FunctionLinearOperator(coupled, in_structure)
rhs = {"a": jnp.array(1.0), "b": jnp.array([2.0, 3.0])}
x = lx.linear_solve(coupled_op, rhs, lx.GMRES(rtol=1e-10, atol=1e-10)).value
print(
    "PyTree solve, x =",
    {k: v.tolist() for k, v in x.items()},
    "; coupled(x) =",
    {k: v.tolist() for k, v in coupled(x).items()},
)


# --- 3. Newton's method with a matrix-free Jacobian --------------------------
def residual(x, args):
    target, coupling = args
    return x**3 + coupling * (jnp.roll(x, 1) - 2 * x + jnp.roll(x, -1)) + x - target


args = (jnp.linspace(0.5, 2.0, n), 0.1)
x = jnp.zeros(n)
solver = lx.GMRES(rtol=1e-10, atol=1e-10)


@jax.jit
def newton_step(x):
    jacobian = lx.JacobianLinearOperator(residual, x, args)
    step = lx.linear_solve(jacobian, -residual(x, args), solver).value
    return x + step


for i in range(6):
    x = newton_step(x)
    print(f"Newton iteration {i}: |F(x)| = {jnp.linalg.norm(residual(x, args)):.2e}")


# --- 4. Reverse-mode Jacobians for functions with only a custom VJP ---------
@jax.custom_vjp
def smooth_relu(x):
    return jnp.logaddexp(x, 0.0) + x


def smooth_relu_fwd(x):
    return smooth_relu(x), x


def smooth_relu_bwd(x, cotangent):
    return (cotangent * (jax.nn.sigmoid(x) + 1.0),)


smooth_relu.defvjp(smooth_relu_fwd, smooth_relu_bwd)

point = jnp.linspace(-1.0, 1.0, 5)
# `jac="bwd"` builds the operator from VJPs: forward mode would fail on custom_vjp.
jac_op = lx.JacobianLinearOperator(lambda x, _: smooth_relu(x), point, jac="bwd")
b = jnp.ones(5)
x = lx.linear_solve(jac_op, b, lx.GMRES(rtol=1e-10, atol=1e-10)).value
exact = b / (jax.nn.sigmoid(point) + 1.0)  # the Jacobian is diagonal
print("Solve with a VJP-only Jacobian: max error", f"{jnp.max(jnp.abs(x - exact)):.1e}")

# `linearise` caches the linearisation so repeated matrix-vector products are cheap.
lin = lx.linearise(lx.JacobianLinearOperator(residual, jnp.ones(n), args))
print(
    "linearise(...) is a", type(lin).__name__, "; mv works:", lin.mv(jnp.ones(n)).shape
)
