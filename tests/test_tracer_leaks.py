"""No tracer outlives its trace through an operator's closure-converted function.

From JAX 0.12 a jaxpr carries its constants (`ClosedJaxpr` is `Jaxpr`), so the
jaxpr that `eqx.filter_closure_convert` keeps held the traced arrays the function
closed over, and as static data of the `linear_solve` primitive it kept them
alive after the trace: `jax.checking_leaks()` raised "Leaked trace" under `jit`
and `grad`. (JAX 0.10's jaxprs hold no constants: there is nothing to leak, and
the test is skipped.)"""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx


pytestmark = pytest.mark.skipif(
    not hasattr(jax.extend.core.Jaxpr, "with_consts"),
    reason="this JAX's jaxprs hold no constants (JAX < 0.12): nothing leaks",
)

_STRUCTURE = jax.ShapeDtypeStruct((3,), jnp.float64)


def _function_operator(a):
    return lx.FunctionLinearOperator(lambda x: a * x + x[::-1] / 10, _STRUCTURE)


def _jacobian_operator(a):
    return lx.JacobianLinearOperator(lambda x, _: a * x + x[::-1] / 10, jnp.ones(3))


@pytest.mark.parametrize("make", [_function_operator, _jacobian_operator])
@pytest.mark.parametrize(
    "solver", [lx.LU(), lx.CG(rtol=1e-10, atol=1e-10, max_steps=20)], ids=["LU", "CG"]
)
@pytest.mark.parametrize("transform", ["jit", "grad", "vmap"])
def test_no_leaked_tracer(make, solver, transform):
    b = jnp.ones(3)
    a = jnp.arange(1.0, 4.0)

    def solve(a):
        op = make(a)
        if isinstance(solver, lx.CG):
            # (CG needs a definite operator: the normal one, `AᵀA`.)
            op = lx.TaggedLinearOperator(op.T @ op, lx.positive_semidefinite_tag)
        return lx.linear_solve(op, b, solver).value

    if transform == "jit":
        fn = jax.jit(solve)
    elif transform == "grad":
        fn = jax.grad(lambda a: jnp.sum(solve(a) ** 2))
    else:
        fn = jax.vmap(solve)
        a = jnp.stack([a, 2 * a])
    with jax.checking_leaks():
        out = fn(a)
    assert np.all(np.isfinite(np.asarray(out)))
