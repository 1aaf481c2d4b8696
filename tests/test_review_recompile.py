"""An adversarial review of retracing and recompilation: how many times a
user's program is traced and compiled, counted (traces of the user's function
with a Python counter, `jit`'s cache sizes, JAX's compile events), never timed,
against lineax 0.1.1 run on the same programs as an oracle outside the test
suite.

Reviewed, and found to agree with or improve on 0.1.1 (no test here):
`jax.jit` and `eqx.filter_jit` taking as arguments operators (matrix, PyTree,
diagonal, tridiagonal, identity, tagged, added, scaled, composed, negated)
and solvers built anew on every call: one compile, then none; `throw`
toggled, `state=` from `solver.init`, `lx.invert` reused, tags given as a
tag, a tuple, a list or a frozenset; the un-jitted `linear_solve` with
solvers, operators, preconditioners (Jacobi, SSOR, block Jacobi) and options
built anew, NumPy or JAX arrays: one compile; a solve in a `lax.scan` body:
one. A function operator closing over arrays is traced once (to a jaxpr), also
under `grad`, `jvp` and `vmap`; one of a function closing over nothing, at
most as often as by 0.1.1 in Krylov solves.

What was found: a `JacobianLinearOperator` of a function that closes over
nothing (Equinox converts it trivially, keeping the Python function) had its
function traced again at every place a Krylov solve applies the operator; a
direct solve of a function or Jacobian operator traced it once more for the
error branch of `throw=True`; and an un-jitted solve of `A * s` compiled its
error check again for each new Python number `s`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx


_TRACES = [0]


def _function():
    """A new function, of no closure (as one defined at the top of a user's
    module: `eqx.filter_closure_convert` keeps it as it is, rather than as a
    jaxpr), counting its traces. New for each program counted, so that no trace
    is shared through JAX's caches."""

    def f(x, args):
        _TRACES[0] += 1
        return args @ x + 0.1 * jnp.sin(x)

    return f


def _solve(f, matrix, vector, solver):
    operator = lx.JacobianLinearOperator(
        f, jnp.zeros(4), matrix, lx.positive_semidefinite_tag
    )
    return lx.linear_solve(operator, vector, solver).value


@pytest.mark.parametrize(
    "solver, before",
    [
        (lx.GMRES(rtol=1e-8, atol=1e-8), (5, 8)),
        (lx.CG(rtol=1e-8, atol=1e-8), (4, 7)),
        (lx.Normal(lx.CG(rtol=1e-8, atol=1e-8)), (6, 10)),
    ],
)
def test_krylov_solve_of_jacobian_operator_traces_its_function_as_a_direct_one(
    solver, before
):
    # Counted to lowering (where a Krylov loop is traced), not compiled. A
    # Krylov solve linearises its operator once, as lineax 0.1.1 did, rather
    # than differentiating the user's function at each product: the function is
    # traced as often as by an `LU` solve (construction, linearisation, the
    # finiteness test of the inputs; and the JVP's tangent operator under
    # `grad`). Before: (primal, grad) = `before`; lineax 0.1.1: (2, 3).
    matrix = jnp.asarray(np.diag([4.0, 5.0, 6.0, 7.0]))
    vector = jnp.ones(4)
    counts = []
    for transform in (lambda g: g, jax.grad):
        f = _function()
        program = transform(lambda m, v, f=f: _solve(f, m, v, solver).sum())
        _TRACES[0] = 0
        jax.jit(program).lower(matrix, vector)
        counts.append(_TRACES[0])
    assert counts == [3, 5], (counts, before)


def test_krylov_solve_of_jacobian_operator_is_unchanged():
    # The linearised solve's values, under `grad` too, against NumPy.
    rng = np.random.RandomState(0)
    a = rng.randn(4, 4)
    matrix = a @ a.T + 4 * np.eye(4)
    vector = rng.randn(4)
    solver = lx.CG(rtol=1e-12, atol=1e-12)
    f = _function()
    value = eqx.filter_jit(_solve)(f, jnp.asarray(matrix), jnp.asarray(vector), solver)
    jac = matrix + 0.1 * np.eye(4)  # the Jacobian at x = 0
    expected = np.linalg.solve(jac, vector)
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    grad = jax.jit(jax.grad(lambda m: _solve(f, m, jnp.asarray(vector), solver).sum()))(
        jnp.asarray(matrix)
    )
    # d/dM sum(J^-1 b) with J = M + 0.1 I: -(J^-T 1) (J^-1 b)^T.
    expected_grad = -np.outer(np.linalg.solve(jac.T, np.ones(4)), expected)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-8)


def test_eager_solve_of_operator_scaled_by_python_numbers_compiles_once():
    # `A * s` keeps a Python number `s` static (its sign gives the tags); an
    # un-jitted solve of it runs the error check compiled (`_error_if_failed`),
    # which was compiled again for each new `s`, although it never reads the
    # operator of a matrix (about 80 ms each). Before: one backend compile per
    # new `s`; lineax 0.1.1 (`s` made an array): none.
    rng = np.random.RandomState(0)
    matrix = jnp.asarray(rng.randn(4, 4) + 4 * np.eye(4))
    vector = jnp.asarray(rng.randn(4))
    operator = lx.MatrixLinearOperator(matrix)
    lx.linear_solve(operator * 0.5, vector)  # compiles what the solve needs
    compiles = []

    def listener(event: str, duration_secs: float, **kwargs: str | int) -> None:
        if "backend_compile" in event:
            compiles.append(event)

    scales = (0.25, 2.0, 3.0)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        values = [lx.linear_solve(operator * s, vector).value for s in scales]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    for s, value in zip(scales, values):
        expected = np.linalg.solve(s * np.asarray(matrix), np.asarray(vector))
        np.testing.assert_allclose(value, expected, rtol=1e-12)


def test_direct_solve_of_jacobian_operator_traces_its_function_twice():
    # Constructed (its output structure), then materialised by `LU.init`, which
    # records the finiteness of that matrix: the error branch of `throw=True`
    # no longer probes the operator's action as well, which traced the function
    # a third time and compiled a copy of it into the branch. lineax 0.1.1: 2.
    f = _function()
    matrix = jnp.asarray(np.diag([4.0, 5.0, 6.0, 7.0]))
    _TRACES[0] = 0
    jax.jit(lambda m, v: _solve(f, m, v, lx.LU())).lower(matrix, jnp.ones(4))
    assert _TRACES[0] == 2


def test_direct_solve_of_nonfinite_jacobian_operator_still_says_so():
    # What the probe was for: a non-finite operator is reported as such, from
    # `init`'s record of the matrix.
    f = _function()
    matrix = jnp.asarray(np.diag([4.0, np.inf, 6.0, 7.0]))
    solve = jax.jit(lambda m, v: _solve(f, m, v, lx.LU()))
    with pytest.raises(Exception, match="contains NaN or inf"):
        solve(matrix, jnp.ones(4)).block_until_ready()
