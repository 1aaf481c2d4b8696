"""Run-time overheads of the direct solves against the closest JAX-native call
(issue 15), pinned by what is compiled and called, never by a clock."""

import collections
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import lineax as lx
import lineax._linear_solve as linear_solve_module


def _custom_calls(compiled_text: str) -> collections.Counter:
    return collections.Counter(
        re.findall(r'custom_call_target="([^"]+)"', compiled_text)
    )


def _triangular_solves(compiled_text: str) -> int:
    return sum(n for name, n in _custom_calls(compiled_text).items() if "trsm" in name)


def _matrix(n: int) -> jax.Array:
    rng = np.random.default_rng(3)
    return jnp.asarray(rng.standard_normal((n, n)) + n * np.eye(n))


def test_inverse_mv_compiles_the_solve_without_the_condition_estimate(monkeypatch):
    # `lx.invert(operator).mv(b)` from Python runs the cached compiled solve.
    # It returned the whole `Solution`, so the compiled program computed LU's
    # `stats["rcond"]` (Hager's estimate: ten triangular solves) on every call,
    # for a value that `mv` drops: 12 triangular solves instead of 2, about 2x
    # the time of JAX's `lu_solve` (n = 300). The solve itself is 2.
    monkeypatch.setattr(linear_solve_module, "_COMPILED", {})
    n = 40
    operator = lx.MatrixLinearOperator(_matrix(n))
    inverse = lx.invert(operator, lx.LU())
    b = jnp.arange(1.0, n + 1)
    np.testing.assert_allclose(
        inverse.mv(b), np.linalg.solve(np.asarray(operator.matrix), b), rtol=1e-12
    )
    (compiled,) = linear_solve_module._COMPILED.values()
    solve = inverse.fn
    assert isinstance(solve, linear_solve_module._InverseSolve)
    leaves = jtu.tree_leaves((solve.operator, b, solve.options, solve.state))
    text = compiled.lower(leaves).compile().as_text()
    assert _triangular_solves(text) == 2, _custom_calls(text)
    # Its outputs are the solution and the result code: not the state, which
    # came back as five copies of the state's arrays on every call.
    outputs = re.search(r"entry_computation_layout=\{\(.*?\)->\((.*?)\)\}", text)
    assert outputs is not None
    assert outputs.group(1) == f"f64[{n}]{{0}}, s32[]", outputs.group(1)
    # A solve from Python that returns the `Solution` still has its statistics,
    # from its own compiled function.
    state = lx.LU().init(operator, {})
    solution = lx.linear_solve(operator, b, lx.LU(), state=state)
    assert 0 < float(solution.stats["rcond"]) <= 1
    assert len(linear_solve_module._COMPILED) == 2


def test_inverse_mv_failure_still_raises_and_reports():
    # The value-only compiled solve keeps the result code: a singular inverse
    # raises with `throw=True`; with `throw=False` it returns what the traced
    # solve returns.
    singular = lx.MatrixLinearOperator(jnp.asarray([[1.0, 2.0], [2.0, 4.0]]))
    two = jnp.asarray([1.0, 1.0])
    with pytest.raises(eqx.EquinoxRuntimeError, match="singular"):
        lx.invert(singular, lx.LU()).mv(two)
    quiet = lx.invert(singular, lx.LU(), throw=False)
    eager = quiet.mv(two)
    assert not np.all(np.isfinite(eager))
    np.testing.assert_array_equal(eager, jax.jit(lambda op, b: op.mv(b))(quiet, two))
    nan = lx.MatrixLinearOperator(jnp.asarray([[jnp.nan, 2.0], [2.0, 4.0]]))
    with pytest.raises(eqx.EquinoxRuntimeError, match="contains NaN or inf"):
        lx.invert(nan, lx.LU()).mv(two)


def test_function_operator_mv_binds_no_method(monkeypatch):
    # Every access to an Equinox module's method builds a bound-method module,
    # flattening the module (for `lx.invert`'s operator: its matrix, state and
    # options): about 60 us of each un-jitted `inverse.mv(b)`, which looked up
    # `self.in_structure()` that way. (Binding `mv` itself is the caller's.)
    bound = []
    original = eqx.Module.__getattribute__

    def counting(self, name):
        out = original(self, name)
        if isinstance(out, eqx._module._prebuilt.BoundMethod):
            bound.append(name)
        return out

    inverse = lx.invert(lx.MatrixLinearOperator(_matrix(4)), lx.LU())
    mv = inverse.mv
    b = jnp.ones(4)
    mv(b)
    monkeypatch.setattr(eqx.Module, "__getattribute__", counting)
    mv(b)
    assert bound == []


_PASS_ALONG = ("tuple", "get-tuple-element", "conditional", "bitcast", "parameter")


def _kernels_reading(compiled_text: str, shape: str) -> list[str]:
    """The instructions of the entry computation of an optimised HLO module that
    read an operand of `shape` (e.g. `f64[16,1000]`): its kernels, as
    instructions that only pass buffers along (a tuple, a conditional) read
    nothing."""
    entry = compiled_text[compiled_text.index("\nENTRY") :]
    shapes, kernels = {}, []
    for line in entry.split("\n")[1:]:
        match = re.match(
            r"\s*(?:ROOT )?(%\S+) = (\S+?)(?:\{[^}]*\})? (\S+?)\((.*)", line
        )
        if match is None:
            continue
        name, out_shape, op, rest = match.groups()
        shapes[name] = out_shape
        operands = re.findall(r"%[\w.\-]+", rest.split(")", 1)[0])
        if op not in _PASS_ALONG and any(shapes.get(x) == shape for x in operands):
            kernels.append(line.strip())
    return kernels


def test_vmapped_diagonal_solve_reads_the_batch_twice():
    # `vmap` of a `Diagonal` solve over k right-hand sides, against `B / d`
    # (one pass over the k x n data). The finiteness test of the solution, which
    # `throw=True` needs (an overflow in `b / d` is `singular`), is one more
    # read of it, as JAX's `B / d` with the same test: XLA:CPU does not fuse a
    # reduction into the kernel that writes its input. Nothing else may touch
    # the batch: the test once stacked the diagonal to the batch (3.5x).
    k, n = 16, 1000
    d = jnp.linspace(1.0, 2.0, n)
    B = jnp.ones((k, n))

    def solve(d, B, throw):
        operator = lx.DiagonalLinearOperator(d)
        return jax.vmap(
            lambda b: lx.linear_solve(operator, b, lx.Diagonal(), throw=throw).value
        )(B)

    for throw, passes in ((True, 2), (False, 1)):
        # (`throw=False` with `result` unused: no test, the one pass of JAX.)
        fn = jax.jit(solve, static_argnums=2)
        text = fn.lower(d, B, throw).compile().as_text()
        assert text is not None
        kernels = _kernels_reading(text, f"f64[{k},{n}]")
        assert len(kernels) == passes, kernels
