"""What XLA:CPU compiles for a dense solve: its compile time is set by the
kernels it emits (each fusion is compiled on its own), which the optimised
program shows. Nothing is timed; the counts are XLA:CPU's layout and fusion
decisions, read from `compiled.as_text()`."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import hlo_computations

import lineax as lx


pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu",
    reason="the counts are XLA:CPU's layout and fusion decisions",
)


# `%name = f32[3,4]{1,0} opcode(%operand, ...)`
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%?([\w.\-]+) = \w+\[[\d,]*\](\{[\d,]*\})? ([\w\-]+)\(([^)]*)\)"
)


def _layout_changing_copies(lines: list[str]) -> int:
    """`copy` instructions among `lines` (one computation) whose operand has
    another layout: a transpose in memory."""
    layouts, copies = {}, []
    for line in lines:
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        name, layout, opcode, operands = match.groups()
        layouts[name] = layout
        if opcode == "copy":
            copies.append((layout, operands.strip().lstrip("%")))
    return sum(1 for layout, operand in copies if layouts.get(operand) != layout)


def _feeding_custom_call(text: str, target: str) -> list[str]:
    """The fused computation whose fusion is the operand of the custom call to
    `target`."""
    comps = hlo_computations(text)
    marker = f'custom_call_target="{target}'
    lines = next(lines for lines in comps.values() if marker in str(lines))
    fusions = {}
    for line in lines:
        match = re.match(r"\s*%?([\w.\-]+) = .* fusion\(.*calls=%?([\w.\-]+)", line)
        if match:
            fusions[match.group(1)] = match.group(2)
    call = next(line for line in lines if marker in line)
    match = re.search(r"custom-call\(%?([\w.\-]+)", call)
    assert match is not None
    operand = match.group(1)
    return comps[fusions[operand]]


def test_svd_hands_lapack_the_matrix_without_transposing_it():
    # LAPACK reads column-major matrices; a row-major `A` is `A^T` in
    # column-major order. The SVD decomposes `A^T`, so the copy XLA makes for
    # LAPACK (which overwrites its input) moves no entry: decomposing `A`, XLA
    # transposed it first, and the solve compiled 1.13x as long as
    # `jnp.linalg.lstsq` (n = 100, float32); now 1.0x.
    matrix = jnp.asarray(np.random.default_rng(0).standard_normal((100, 100)))
    vector = jnp.ones(100)

    def solve(matrix, vector):
        operator = lx.MatrixLinearOperator(matrix)
        return lx.linear_solve(operator, vector, lx.SVD()).value

    text = jax.jit(solve).lower(matrix, vector).compile().as_text()
    assert text is not None
    assert _layout_changing_copies(_feeding_custom_call(text, "lapack_dgesdd")) == 0
    np.testing.assert_allclose(
        solve(matrix, vector), np.linalg.solve(matrix, vector), rtol=1e-8
    )


def test_small_lu_condition_estimate_needs_no_permutation():
    # For n <= 32 the estimate is exact, from the inverse; its 1-norm is that of
    # `U^{-1} L^{-1}` (the permutation only reorders columns), so the identity
    # is solved as a constant, not gathered by the permutation: one kernel
    # fewer in every solve that returns `stats` (an un-jitted solve compiles
    # them all). Here the estimate alone needs no permutation, whose
    # computation from LAPACK's pivots (a loop) XLA then removes.
    matrix = jnp.asarray(np.random.default_rng(1).standard_normal((10, 10)))

    def rcond(matrix, vector):
        operator = lx.MatrixLinearOperator(matrix)
        return lx.linear_solve(operator, vector, lx.LU(), throw=False).stats["rcond"]

    text = jax.jit(rcond).lower(matrix, jnp.ones(10)).compile().as_text()
    assert text is not None
    assert " while(" not in text
    want = 1 / (np.linalg.norm(matrix, 1) * np.linalg.norm(np.linalg.inv(matrix), 1))
    np.testing.assert_allclose(rcond(matrix, jnp.ones(10)), want, rtol=1e-10)


def test_solve_returning_state_and_statistics_kernels():
    # What an un-jitted solve compiles on its first call: the solution, the
    # state and the statistics. Beyond `jnp.linalg.solve`'s kernels, the
    # state's norms, its finiteness test, the layout of its factors, the
    # condition estimate and the solve's own test add 5 under the tests' XLA
    # flags (see conftest.py), 6 under XLA's defaults; 6 and 8 before the
    # estimate solved an unpermuted constant identity and read each norm once.
    matrix = jnp.asarray(np.random.default_rng(2).standard_normal((10, 10)))
    vector = jnp.ones(10)

    def ours(matrix, vector):
        return lx.linear_solve(lx.MatrixLinearOperator(matrix), vector, lx.LU())

    def kernels(fn):
        text = jax.jit(fn).lower(matrix, vector).compile().as_text()
        assert text is not None
        return text.count(" fusion(")

    assert kernels(ours) - kernels(jnp.linalg.solve) <= 5


def test_qr_of_a_jacobian_computes_it_once():
    # Optimistix's GaussNewton and LevenbergMarquardt factorise a Jacobian with
    # QR (their default, `AutoLinearSolver(well_posed=None)`). `init`'s
    # finiteness test read the matrix: `geqrf` overwrites its own copy, so XLA
    # computed the Jacobian a second time, in the test's kernel. It reads the
    # factors, as LU's does. (The row order chosen before `geqrf` reads the
    # matrix twice, its magnitudes as the operand of the loop choosing a row
    # per column and the rows' sizes for the rows left, and XLA fuses the
    # Jacobian into both: three `sine`s here, four if the finiteness test read
    # the matrix; two with the earlier order by size alone, one reader. An
    # `optimization_barrier` on the matrix, tried then, changed nothing.)
    def residuals(p, args):
        return p[0] * jnp.sin(p[1] * args) - args

    def init(p):
        jacobian = lx.JacobianLinearOperator(residuals, p, jnp.linspace(0, 3, 7))
        return lx.AutoLinearSolver(well_posed=None).init(lx.linearise(jacobian), {})

    p = jnp.array([1.0, 0.5])
    text = jax.jit(init).lower(p).compile().as_text()
    assert text is not None
    assert len(re.findall(r" sine\(", text)) == 3


def test_lu_of_a_jacobian_computes_it_once():
    # Diffrax's implicit solvers and Optimistix's Newton factorise a Jacobian
    # (`lx.linearise(lx.JacobianLinearOperator(...))`, a matrix the operator
    # computes) and carry the state through their loops, reading no `stats`.
    # The 1-norm of `A` that the condition estimate needs was read from the
    # matrix in `init`: `getrf` overwrites its own copy, so XLA computed the
    # Jacobian a second time for it (two `cosine`s here). For a small matrix it
    # comes from the factors, with the estimate, and XLA removes it.
    def field(y, args):
        return jnp.sin(y) * args + jnp.roll(y, 1) ** 2

    def init(y):
        jacobian = lx.JacobianLinearOperator(field, y, jnp.array(2.0))
        return lx.AutoLinearSolver(well_posed=None).init(lx.linearise(jacobian), {})

    y = jnp.linspace(0.1, 1.0, 5)
    text = jax.jit(init).lower(y).compile().as_text()
    assert text is not None
    assert len(re.findall(r" cosine\(", text)) == 1

    # The condition estimate from the factors' norm: as from the matrix's.
    operator = lx.linearise(lx.JacobianLinearOperator(field, y, jnp.array(2.0)))
    matrix = operator.as_matrix()
    for solver in (lx.LU(), lx.AutoLinearSolver(well_posed=None)):
        ours = lx.linear_solve(operator, y, solver).stats["rcond"]
        want = lx.linear_solve(lx.MatrixLinearOperator(matrix), y, solver).stats[
            "rcond"
        ]
        np.testing.assert_allclose(ours, want, rtol=1e-5)


def _hoisted_fusions(text: str, ops: str) -> list[str]:
    """The fusions of an optimised module that compute an operation traced in a
    `while` loop's body (`ops`, a regex of the last part of its name) outside
    that body: hoisted out of the loop by XLA, each a kernel of its own."""
    computations = hlo_computations(text)
    bodies = set(re.findall(r"body=%([\w.\-]+)", text))
    return [
        line.split("=")[0].strip()
        for name, lines in computations.items()
        if name not in bodies
        for line in lines
        if " fusion(" in line
        and re.search(r'op_name="[^"]*while/body/(' + ops + r')"', line)
    ]


def test_zero_pivot_marker_of_a_kept_factorisation_is_not_a_kernel_of_its_own():
    # Diffrax's implicit solvers factorise the Jacobian once per step and solve
    # with the state in their Newton loop. The zero-pivot marker (infinity at
    # an exactly zero pivot, `inf_at_zero_pivots`) was a function of the
    # factor alone, `x / (pivots != 0)`: XLA hoisted `pivots != 0` out of the
    # loop, into kernels of their own that test the diagonal (Kvaerno5 on
    # Robertson's problem: 2, and the division one more in the loop). It is
    # computed with the solution now, which XLA fuses into its readers.
    def field(y, args):
        return jnp.sin(y) * args + jnp.roll(y, 1) ** 2 - 1

    def newton(y):
        jacobian = lx.JacobianLinearOperator(field, y, jnp.array(2.0))
        operator = lx.linearise(jacobian)
        solver = lx.AutoLinearSolver(well_posed=None)
        state = solver.init(operator, {})

        def step(carry):
            i, y, _ = carry
            sol = lx.linear_solve(
                operator, field(y, 2.0), solver, state=state, throw=False
            )
            return i + 1, y - sol.value, sol.result._value

        def again(carry):
            return carry[0] < 5

        return jax.lax.while_loop(again, step, (0, y, jnp.array(0, jnp.int32)))

    y = jnp.linspace(0.1, 1.0, 5)
    text = jax.jit(newton).lower(y).compile().as_text()
    assert text is not None
    assert _hoisted_fusions(text, "ne|convert_element_type|div") == []
    # Still infinite at the zero pivot (not NaN: see `inf_at_zero_pivots`), in
    # a loop as in a single solve.
    singular = lx.MatrixLinearOperator(jnp.array([[1.0, 2.0], [3.0, 6.0]]))
    state = lx.LU().init(singular, {})

    def loop(b):
        def step(i, x):
            del i
            return lx.linear_solve(singular, b, lx.LU(), state=state, throw=False).value

        return jax.lax.fori_loop(0, 2, step, b)

    value = jax.jit(loop)(jnp.array([1.0, 1.0]))
    assert np.isinf(value).any() and not np.isnan(value).any()


def test_rms_norm_is_one_reduction():
    # Optimistix and Diffrax call `rms_norm` once per step. Scaled by the
    # largest entry (against overflow), it was a maximum and then a sum: two
    # reductions, each a kernel, and the input a kernel more where both read a
    # computed vector (Diffrax's error estimate). One pass with Blue's
    # thresholds (`_one_pass_two_norm`) is one reduction, as safe.
    def norm(y, scale):
        return lx.internal.rms_norm(jnp.where(scale > 0, y / scale, jnp.inf))

    y, scale = jnp.linspace(-1.0, 2.0, 7), jnp.linspace(0.5, 1.5, 7)
    text = jax.jit(norm).lower(y, scale).compile().as_text()
    assert text is not None
    assert len(re.findall(r" reduce\(", text)) == 1
