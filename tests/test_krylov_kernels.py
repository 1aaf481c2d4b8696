"""A step of CG and BiCGStab launches no more kernels than `jax.scipy`'s.

On a GPU these solves, at the sizes of the benchmarks, cost kernel launches rather
than arithmetic (an H200 took 1.3x jax.scipy's time while they launched more
kernels per step; a CPU is not bound by them). What a step launches is read from
the optimised program: the kernels (fusions, custom calls, copies and the other
non-trivial instructions) of the innermost while loop's body and condition, which
run once per step. Nothing is run, so no solve can hang here.
"""

import re

import jax
import jax.numpy as jnp
import jax.scipy.sparse.linalg as jssl
import pytest
from helpers import hlo_computations, recorded_jax_only

import lineax as lx


# Instructions that are no kernel of their own.
_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast"}
# (64 x 64 as in the benchmarks: below about 4096 entries XLA:CPU splits each
# reduction into two kernels, on both sides.)
N = 64


def _opcode(line: str) -> str | None:
    line = re.sub(r"/\*.*?\*/", "", line)
    match = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = .*? ([\w\-]+)\(", line)
    return None if match is None else match.group(1)


def _kernels_per_step(fn, *args) -> int:
    """Kernels of the innermost while loop (body and condition) of `fn`."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    assert text is not None
    comps = hlo_computations(text)
    loops = re.findall(r"condition=%?([\w.\-]+), body=%?([\w.\-]+)", text)
    counts = []
    for cond, body in loops:
        ops = [_opcode(line) for line in comps[cond] + comps[body]]
        if "while" in ops:
            continue  # an outer loop
        counts.append(sum(1 for op in ops if op is not None and op not in _FREE))
    assert len(counts) == 1, loops
    return counts[0]


def _stencil(x):
    # The 2-D Laplacian plus 0.05 I (`_convection`: plus upwind convection).
    u = x.reshape(N, N)
    p = jnp.pad(u, 1)
    lap = 4.05 * u - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:]
    return lap.reshape(-1)


def _convection(x):
    u = x.reshape(N, N)
    return _stencil(x) + (u - jnp.pad(u, ((0, 0), (1, 0)))[:, :-1]).reshape(-1)


def _stencil_solve(solver, mv, tags):
    """The float32 solve of the N x N stencil `mv` by `solver`, and its vector."""
    b = jnp.ones(N * N, jnp.float32)
    struct = jax.ShapeDtypeStruct(b.shape, b.dtype)
    method = solver(rtol=1e-5, atol=0.0, norm=lx.internal.two_norm)

    def solve(b):
        op = lx.FunctionLinearOperator(mv, struct, tags)
        return lx.linear_solve(op, b, method).value

    return solve, b


_XLA_CPU_ONLY = pytest.mark.skipif(
    jax.default_backend() != "cpu",
    reason="the counts are XLA:CPU's fusion decisions",
)


@_XLA_CPU_ONLY
@pytest.mark.parametrize(
    "solver, jax_solver, mv, tags",
    [
        (lx.CG, jssl.cg, _stencil, (lx.positive_semidefinite_tag,)),
        (lx.BiCGStab, jssl.bicgstab, _convection, ()),
    ],
    ids=["cg", "bicgstab"],
)
def test_krylov_step_launches_no_more_kernels_than_jax_scipy(
    solver, jax_solver, mv, tags
):
    b = jnp.ones(N * N, jnp.float32)
    struct = jax.ShapeDtypeStruct(b.shape, b.dtype)
    method = solver(rtol=1e-5, atol=0.0, norm=lx.internal.two_norm)

    def ours(b):
        op = lx.FunctionLinearOperator(mv, struct, tags)
        return lx.linear_solve(op, b, method, throw=False).value

    def theirs(b):
        return jax_solver(mv, b, tol=1e-5, atol=0.0)[0]

    assert _kernels_per_step(ours, b) <= _kernels_per_step(theirs, b)


def _canonical(comps: dict[str, list[str]], name: str) -> str:
    """The computation `name` with its instruction names numbered in order, its
    metadata dropped and the computations it calls written out. XLA:CPU compiles
    one kernel for fusions whose fused computations are the same ("Reusing
    kernel" in its log, `TF_CPP_VMODULE=thunk_emitter=2`: a step's two products
    with the operator, the verification's padding); two that read alike here
    are counted once. (A lower bound: XLA's test of sameness is stricter. It
    compiled twice the scalar kernel that makes a power-of-two scale, written
    alike for `b`'s and for the operator's scale, which read alike here.)"""
    numbers = {}
    lines = []
    for line in comps[name]:
        line = re.sub(r", metadata=\{[^}]*\}", "", line)
        line = re.sub(r"/\*.*?\*/", "", line)
        for callee in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line):
            line = line.replace(callee, "{" + _canonical(comps, callee) + "}")
        line = re.sub(
            r"%[\w.\-]+",
            lambda m: numbers.setdefault(m.group(0), f"%{len(numbers)}"),
            line,
        )
        lines.append(line.strip())
    return "\n".join(lines)


def _kernels_outside_step(fn, *args) -> int:
    """Kernels of `fn` that XLA:CPU compiles outside the innermost while loop's:
    those of the entry computation, of the outer loop's body and condition, and of
    the branches of conditionals (each compiled, whether it runs or not). A fusion
    that reads like one compiled before (in the step, or outside it) is no kernel
    to compile (see `_canonical`)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    assert text is not None
    comps = hlo_computations(text)
    loops = re.findall(r"condition=%?([\w.\-]+), body=%?([\w.\-]+)", text)
    entry = re.search(r"^ENTRY %?([\w.\-]+) ", text, re.M)
    assert entry is not None
    names = [entry.group(1)]
    step = []
    for cond, body in loops:
        ops = [_opcode(line) for line in comps[cond] + comps[body]]
        if "while" in ops:
            names += [cond, body]
        else:
            step += [cond, body]
    for branches in re.findall(r"branch_computations=\{([^}]*)\}", text):
        names += [x.strip().lstrip("%") for x in branches.split(",")]

    def fused(line: str) -> str | None:
        match = re.search(r" fusion\(.*calls=%?([\w.\-]+)", line)
        return None if match is None else _canonical(comps, match.group(1))

    compiled = {fused(line) for name in step for line in comps[name]}
    count = 0
    for line in (line for name in names for line in comps[name]):
        op = _opcode(line)
        if op is None or op in _FREE:
            continue
        kernel = fused(line)
        if kernel is None or kernel not in compiled:
            count += 1
            compiled.add(kernel)
    return count


@_XLA_CPU_ONLY
@pytest.mark.parametrize(
    "solver, mv, tags, bound",
    [
        (lx.CG, _stencil, (lx.positive_semidefinite_tag,), 27),
        (lx.BiCGStab, _convection, (), 31),
        (lx.GMRES, _convection, (), 41),
    ],
    ids=["cg", "bicgstab", "gmres"],
)
def test_krylov_solve_kernels_outside_the_step(solver, mv, tags, bound):
    # On XLA:CPU each kernel costs 10-20 ms of compile time, a scalar one as much
    # as a large one. Recorded after removing the outer loop's square-root kernel
    # (the best-iterate flag is read from the packed book) and the throw=True
    # predicate's kernel (the branch index is the failure code): 34 and 39 before.
    # BiCGStab: 37 -> 43 for the product with the operator that estimates its
    # scale once (`Problem.op_inverse`: a stencil's product, its largest exponent
    # and the selection of the scale), without which an operator of norm 1e20 in
    # float32 took 1.3-4x the steps (its `<t, t>` overflowed). 32 and 38 ->
    # 31 and 37 with the unread history compiled away (its NaN initialisation).
    # Counted since as the kernels XLA:CPU compiles, a fusion that reads like
    # one compiled before counting nothing (`_canonical`): CG 28, BiCGStab 33,
    # GMRES 55; then CG 27 with the throw=True error branch's probe of a function
    # operator's action made outside the branch (its product is then the
    # step's, compiled once: a pad and a stencil less, a broadcast more).
    # GMRES 55 -> 43 with its cycle's scalars stacked (a step's four, a
    # restart's three: one kernel each) and its identity matrices constants.
    # BiCGStab 33 -> 31 and GMRES 43 -> 42 (sixteenth round): the target without
    # `atol`'s term when `atol` is 0 (the scale of `b`, read by the initial
    # packings through it, was then a kernel of its own), and BiCGStab's
    # half-step threshold in squares (`sqrt(<b, b>)`, read by two packings, was
    # a kernel of its own). GMRES 42 -> 41 (seventeenth round): R carried
    # transposed (LAPACK reads it column-major: carried as R, XLA copied it
    # into that layout before every solve, a kernel of its own).
    solve, b = _stencil_solve(solver, mv, tags)
    assert _kernels_outside_step(solve, b) <= bound


@_XLA_CPU_ONLY
def test_gmres_step_kernels():
    # GMRES's Arnoldi step (JAX's `gmres` has several inner loops, so it is
    # bounded alone). 33 -> 30 (seventeenth round): the new column of H as a
    # select, not a `dynamic_update_slice` (which updated a copy of `h + h2` in
    # place for the rotation's product and computed it again for its norm:
    # three kernels for one).
    solve, b = _stencil_solve(lx.GMRES, _convection, ())
    assert _kernels_per_step(solve, b) <= 30


@pytest.mark.parametrize(
    "solver, mv, tags",
    [
        (lx.CG, _stencil, (lx.positive_semidefinite_tag,)),
        (lx.BiCGStab, _convection, ()),
        (lx.GMRES, _convection, ()),
    ],
    ids=["cg", "bicgstab", "gmres"],
)
def test_unread_residual_history_is_compiled_away(solver, mv, tags):
    # Where the statistics are not read, XLA removes the residual history from
    # the loops (a loop value that only feeds itself), also where every `k`-th
    # step is recorded (the default `history_length`, 10^4 entries, for
    # `max_steps` = 40960 here): the program is the one without a history.
    # Carried through both loops it was not (CG: 26 HLO instructions more).
    b = jnp.ones(N * N, jnp.float32)
    struct = jax.ShapeDtypeStruct(b.shape, b.dtype)

    def hlo(**kwargs):
        method = solver(rtol=1e-5, atol=0.0, norm=lx.internal.two_norm, **kwargs)

        def solve(b):
            op = lx.FunctionLinearOperator(mv, struct, tags)
            return lx.linear_solve(op, b, method).value

        text = jax.jit(solve).lower(b).compile().as_text()
        assert text is not None
        return [_opcode(line) for line in text.splitlines() if _opcode(line)]

    assert len(hlo()) == len(hlo(history_length=0))


# Instructions of a fused computation that cost XLA:CPU nothing to compile:
# reading an operand or a scalar of a stacked array (a slice and a bitcast, index
# arithmetic) and constants. The others, arithmetic, comparisons, selects,
# conversions, broadcasts, cost about 0.3-0.4 ms each (20 kernels of 40 or 80
# multiply-adds, scalar or of 4096 entries; slices of a stacked array and
# constants added to them changed nothing measurable).
_FREE_IN_FUSION = {"parameter", "constant", "slice", "bitcast"}


def _fused_operations(fn, *args, step_only: bool = False) -> int:
    """Operations (not `_FREE_IN_FUSION`) in the fused computations of `fn`'s
    optimised program; with `step_only`, those of the kernels of its innermost
    while loop (body and condition). XLA copies a cheap scalar computation into
    every kernel that reads it, so each copy counts."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    assert text is not None
    comps = hlo_computations(text)
    callers = list(comps)
    if step_only:
        loops = re.findall(r"condition=%?([\w.\-]+), body=%?([\w.\-]+)", text)
        callers = [
            name
            for cond, body in loops
            if "while" not in [_opcode(x) for x in comps[cond] + comps[body]]
            for name in (cond, body)
        ]
    fused = [
        callee
        for name in callers
        for line in comps[name]
        for callee in re.findall(r" fusion\(.*calls=%?([\w.\-]+)", line)
    ]
    ops = [_opcode(line) for name in fused for line in comps[name]]
    return sum(1 for op in ops if op is not None and op not in _FREE_IN_FUSION)


@recorded_jax_only
@_XLA_CPU_ONLY
@pytest.mark.parametrize(
    "solver, mv, tags, step_bound, bound",
    [
        (lx.CG, _stencil, (lx.positive_semidefinite_tag,), None, 212),
        (lx.BiCGStab, _convection, (), 164, 387),
        (lx.GMRES, _convection, (), None, 418),
    ],
    ids=["cg", "bicgstab", "gmres"],
)
def test_krylov_solve_operations_in_kernels(solver, mv, tags, step_bound, bound):
    # XLA:CPU compiles each operation of a kernel (about 0.3-0.4 ms each, see
    # `_FREE_IN_FUSION`), and copies cheap scalar computations into each kernel
    # that reads them. Recorded after (eleventh round, docs/compile-history.md):
    # BiCGStab's step decisions written without negations, its `omega` as the
    # quotient of the selected terms (a division, which XLA does not copy: the
    # decision is made once, not again in the updates of `x` and `r`), `eps^2`
    # folded into the carried shadow norm; the outer loop's conditions without
    # negations; the scales' integer arithmetic on the bits. Whole program
    # before -> after: CG 236 -> 223, BiCGStab 436 -> 387 (its step's kernels
    # 197 -> 164), GMRES 393 -> 373. (The published lineax 0.1.1: CG 100,
    # BiCGStab 145, GMRES 213.) GMRES 372 -> 389 with its cycle's scalars
    # stacked: their conversions and tests inside the kernels that read them,
    # where each carried scalar was a kernel of its own (4 kernels less).
    # Sixteenth round: the target without `atol`'s term when `atol` is 0, CG 223
    # -> 211; GMRES 389 -> 409, as the scale of `b` is no longer a kernel of its
    # own (43 -> 42 kernels) but its integer arithmetic is copied into the
    # kernels that read it (the operator-scale product, the lifted `b`, the final
    # scaling): one kernel less measured faster to compile (A/B, 0.95).
    # Seventeenth round: GMRES 409 -> 417 with 3 kernels fewer (50 -> 47
    # compiled): the new column's select is copied into its two readers (the
    # rotation's product and the column's norm). Then +1 each (CG 212, BiCGStab
    # 387, GMRES 418): the finiteness test sums absolute values in every solve
    # (one variant of it, where the dense solves' error index needed a second),
    # the absolute value fused into its reduction; the same kernels.
    solve, b = _stencil_solve(solver, mv, tags)
    assert _fused_operations(solve, b) <= bound
    if step_bound is not None:
        assert _fused_operations(solve, b, step_only=True) <= step_bound
