"""`throw=False` is honoured under every transformation; `throw=True` says which
solve failed; repeated calls never retrace."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DelegatingLU

import lineax as lx


SINGULAR = jnp.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [1.0, 0.0, 1.0]])
GOOD = jnp.array([[3.0, 1.0, 0.0], [1.0, 4.0, 1.0], [0.0, 1.0, 5.0]])
B = jnp.array([1.0, 2.0, 3.0])


def _lu(a, b):
    return lx.linear_solve(lx.MatrixLinearOperator(a), b, lx.LU(), throw=False)


def _gmres(a, b):
    # Two steps cannot solve a generic 3x3 system: max_steps_reached.
    solver = lx.GMRES(rtol=1e-10, atol=1e-10, max_steps=1, restart=1)
    return lx.linear_solve(lx.MatrixLinearOperator(a), b, solver, throw=False)


FAILING = [
    pytest.param(_lu, SINGULAR, "singular", id="singular_lu"),
    pytest.param(_gmres, GOOD, "max_steps_reached", id="nonconverging_gmres"),
]


@pytest.mark.parametrize("solve,matrix,member", FAILING)
def test_throw_false_never_raises_under_autodiff(solve, matrix, member):
    if solve is _gmres and not hasattr(lx, "GMRES"):
        pytest.skip("GMRES not available")
    expected = getattr(lx.RESULTS, member)
    value = lambda a, b: solve(a, b).value
    # Primal: the result reports the failure.
    solution = solve(matrix, B)
    assert solution.result == expected
    # JVP: no error; the primal result still reports the failure, and the failed
    # tangent solve gives NaN tangents rather than a plausible-looking derivative.
    # Un-jitted, as in a notebook: where lineax 0.1.1 ignored `throw=False`.
    (primal_sol, tangent_sol) = jax.jvp(
        lambda a: solve(a, B), (matrix,), (jnp.ones_like(matrix),)
    )
    assert primal_sol.result == expected
    assert np.all(np.isnan(tangent_sol.value))
    # Reverse mode: no error; the cotangents of a failed cotangent solve are NaN.
    grad = jax.grad(lambda a, b: jnp.sum(value(a, b)), argnums=(0, 1))(matrix, B)
    assert np.all(np.isnan(grad[0])) and np.all(np.isnan(grad[1]))
    # Jacobians, and vmap of them (one failing and one succeeding element); each
    # compiled once rather than op by op (the library traces the same path).
    assert np.all(np.isnan(jax.jit(jax.jacfwd(value))(matrix, B)))
    assert np.all(np.isnan(jax.jit(jax.jacrev(value))(matrix, B)))
    batch = jnp.stack([matrix, GOOD * 10 if solve is _lu else matrix])
    grads = jax.jit(jax.vmap(jax.grad(lambda a: jnp.sum(value(a, B)))))(batch)
    assert np.all(np.isnan(grads[0]))
    if solve is _lu:
        ref = jax.grad(lambda a: jnp.sum(jnp.linalg.solve(a, B)))(GOOD * 10)
        np.testing.assert_allclose(grads[1], ref, rtol=1e-10)


class _FailsOnLargeVectors(DelegatingLU):
    """LU, but reporting failure for right-hand sides with entries above 100: lets
    a test make only the tangent or cotangent solve fail."""

    def compute(self, state, vector, options):
        x, _, stats = lx.LU().compute(state, vector, options)
        fail = jnp.max(jnp.abs(vector)) > 100
        return (
            x,
            lx.RESULTS.where(fail, lx.RESULTS.breakdown, lx.RESULTS.successful),
            stats,
        )


def test_throw_true_names_the_failed_solve():
    solver = _FailsOnLargeVectors()

    def solve(b):
        return lx.linear_solve(lx.MatrixLinearOperator(GOOD), b, solver).value

    solve(B)  # primal fine
    with pytest.raises(eqx.EquinoxRuntimeError, match="`linear_solve` failed"):
        solve(B * 1000)
    with pytest.raises(eqx.EquinoxRuntimeError, match="tangent linear solve failed"):
        jax.jvp(solve, (B,), (B * 1000,))
    # (The cotangent solve runs in JAX's backward pass, after `linear_solve`
    # returned, as part of the one `jax.jit` that an un-jitted `jax.grad` runs
    # the solve as: its failure surfaces as under a user's `jax.jit`, a
    # `JaxRuntimeError` holding the message.)
    with pytest.raises(RuntimeError, match="cotangent linear solve failed"):
        jax.grad(lambda b: 1000 * jnp.sum(solve(b)))(B)


def test_no_retracing():
    traces = []

    class Counting(DelegatingLU):
        def init(self, operator, options):
            traces.append(1)
            return lx.LU().init(operator, options)

    solver = Counting()
    # Through the un-jitted entry point, with new operator objects each time.
    for scale in (1.0, 2.0, 3.0):
        lx.linear_solve(lx.MatrixLinearOperator(GOOD * scale), B * scale, solver)
    assert len(traces) == 1
    # Inside jax.jit.
    traces.clear()
    fn = jax.jit(
        lambda a, b: lx.linear_solve(lx.MatrixLinearOperator(a), b, solver).value
    )
    for scale in (1.0, 2.0, 3.0):
        fn(GOOD * scale, B)
    assert len(traces) == 1
    # A new dtype does retrace (once).
    lx.linear_solve(
        lx.MatrixLinearOperator(GOOD.astype(jnp.float32)), B.astype(jnp.float32), solver
    )
    assert len(traces) == 2


def _throwing_lu(a, b):
    return lx.linear_solve(lx.MatrixLinearOperator(a), b, lx.LU()).value


# One jitted function per wrapper, shared by the cases (compile time).
_THROWING_VMAPS = {
    "jax.jit": jax.jit(jax.vmap(_throwing_lu, in_axes=(0, None))),
    "eqx.filter_jit": eqx.filter_jit(jax.vmap(_throwing_lu, in_axes=(0, None))),
    "un-jitted": jax.vmap(_throwing_lu, in_axes=(0, None)),
}


@pytest.mark.parametrize("wrapper", list(_THROWING_VMAPS))
def test_throw_true_message_under_vmap_and_jit(wrapper):
    """With `throw=True` whether the input was finite is decided on the host, in
    the error branch, once per batch element: a batch with a singular element
    says "singular", one with a NaN matrix says "NaN or inf", and a batch with
    both reports the larger code (`nonfinite_input`), as `branched_error_if`
    does for a batch."""
    solve = _THROWING_VMAPS[wrapper]
    nan = GOOD.at[1, 1].set(jnp.nan)
    np.testing.assert_allclose(
        solve(jnp.stack([GOOD, GOOD * 2]), B)[0], np.linalg.solve(GOOD, B)
    )
    singular_message = lx.RESULTS[lx.RESULTS.singular][:40]
    nonfinite_message = lx.RESULTS[lx.RESULTS.nonfinite_input][:40]
    for batch, message, not_message in (
        ([GOOD, SINGULAR], singular_message, nonfinite_message),
        ([nan, GOOD], nonfinite_message, singular_message),
        ([SINGULAR, nan, GOOD], nonfinite_message, singular_message),
    ):
        with pytest.raises(Exception, match="`linear_solve` failed") as info:
            jax.block_until_ready(solve(jnp.stack(batch), B))
        assert message in str(info.value)
        assert not_message not in str(info.value)


def test_branch_on_code_takes_the_failure_branch_for_every_nonzero_code():
    # The error branch is chosen by the failure code itself, as an index past the
    # end of two branches for codes above 1 (XLA runs the last branch). Also
    # with a concrete code under `jax.disable_jit`, where JAX's switch would index
    # its branches with the code directly (an IndexError for codes above 1).
    from lineax._errors import branch_on_code

    def branch(code):
        return branch_on_code(code, lambda x: x + 1, lambda x: x, jnp.float32(0))

    codes = jnp.array([0, 1, 2, 5], jnp.int32)
    expected = np.array([0, 1, 1, 1], np.float32)
    jitted = jax.jit(branch)
    np.testing.assert_array_equal([jitted(c) for c in codes], expected)
    with jax.disable_jit():
        np.testing.assert_array_equal([branch(c) for c in codes], expected)
    # Under vmap one failed element takes the whole batch into the branch.
    np.testing.assert_array_equal(jax.vmap(branch)(codes), np.ones(4, np.float32))
    np.testing.assert_array_equal(jax.vmap(branch)(codes[:1]), np.zeros(1))


def test_nonfinite_initial_guess_is_nonfinite_input():
    # A NaN in `y0` was reported as a `breakdown` ("the operator is singular, or
    # not positive definite"), by every Krylov solver: the inputs examined after
    # a failure were the operator and the vector only.
    operator = lx.MatrixLinearOperator(GOOD, lx.positive_semidefinite_tag)
    y0 = jnp.array([1.0, jnp.nan, 0.0])
    nonfinite = lx.RESULTS.nonfinite_input
    solvers = [lx.CG, lx.GMRES, lx.BiCGStab, lx.MINRES, lx.LSMR]
    for solver in solvers:  # un-jitted (the entry point's host check), NumPy y0
        solution = lx.linear_solve(
            operator, B, solver(1e-8, 1e-8), options={"y0": np.asarray(y0)}, throw=False
        )
        assert solution.result == nonfinite, solver

    @jax.jit
    def batched(y0s):
        # (Under `vmap`, one member with a NaN guess, one without.)
        solve = lambda y0: (
            lx.linear_solve(
                operator, B, lx.CG(1e-8, 1e-8), options={"y0": y0}, throw=False
            ).result._value
        )
        return jax.vmap(solve)(y0s)

    codes = batched(jnp.stack([y0, jnp.zeros(3)]))
    assert codes[0] == nonfinite._value and codes[1] == 0

    @jax.jit
    def thrown(y0):
        return lx.linear_solve(
            operator, B, lx.GMRES(1e-8, 1e-8), options={"y0": y0}
        ).value

    # (Under `jit`, XLA's runtime error carries the message.)
    with pytest.raises(Exception, match="`linear_solve` failed") as info:
        jax.block_until_ready(thrown(y0))
    assert "initial guess `y0` contains NaN" in str(info.value)
    # A function operator (whose arrays the solve cannot read, so it tests the
    # action on a probe instead), with throw=False under jit.
    function = lx.FunctionLinearOperator(
        lambda x: GOOD @ x, jax.ShapeDtypeStruct((3,), GOOD.dtype)
    )
    code = jax.jit(
        lambda y0: (
            lx.linear_solve(
                function, B, lx.GMRES(1e-8, 1e-8), options={"y0": y0}, throw=False
            ).result._value
        )
    )(y0)
    assert code == nonfinite._value


@pytest.mark.parametrize("solver", [lx.LU(), lx.Cholesky(), lx.QR(), lx.SVD()])
def test_dense_error_branch_is_taken_only_when_the_solve_failed(solver, monkeypatch):
    # A float32 dense solve chooses its error branch by the bits of its
    # finiteness test (`tree_finite_index`): the host is called only where the
    # solve failed, and then raises its message. A negative solution (whose
    # products with the matrix's zeros are -0.0) must not take the branch: a
    # host call at every solve. Also under `vmap`, where one failing member
    # makes the batch take it.
    import lineax._primitive as primitive

    calls = []
    host = primitive._host_failure_code

    def counted(*args, **kwargs):
        calls.append(1)
        return host(*args, **kwargs)

    monkeypatch.setattr(primitive, "_host_failure_code", counted)
    tags = lx.positive_semidefinite_tag if isinstance(solver, lx.Cholesky) else ()
    rng = np.random.default_rng(0)
    root = rng.standard_normal((6, 6))
    matrix = (root @ root.T + 6 * np.eye(6)).astype(np.float32)

    def solve(a, b):
        return lx.linear_solve(lx.MatrixLinearOperator(a, tags), b, solver).value

    b = -(matrix @ np.ones(6, np.float32))  # the solution is -1 everywhere
    with jax.enable_x64(False):
        x = jax.jit(solve)(matrix, b)
        np.testing.assert_allclose(x, -np.ones(6), rtol=1e-4)
        xs = jax.jit(jax.vmap(solve, in_axes=(None, 0)))(matrix, np.stack([b, b]))
        np.testing.assert_allclose(xs, -np.ones((2, 6)), rtol=1e-4)
        assert calls == []
        bad = np.stack([b, b])
        bad[1, 2] = np.nan
        with pytest.raises(Exception, match="contains NaN"):
            jax.block_until_ready(
                jax.jit(jax.vmap(solve, in_axes=(None, 0)))(matrix, bad)
            )
        assert calls
        calls.clear()
        if isinstance(solver, (lx.LU, lx.Cholesky)):
            singular = np.zeros((6, 6), np.float32)
            singular[0, 0] = 1
            with pytest.raises(Exception, match="singular"):
                jax.block_until_ready(jax.jit(solve)(singular, b))
            assert calls
