"""The `linear_solve_p` primitive: implementation, abstract evaluation, the
pseudoinverse JVP, the transpose rule, and (through `equinox.internal.create_vprim`)
batching.

Binding a primitive, rather than tracing the solver directly, is what makes every
solver differentiable for free: autodiff never sees the solver's internals (a
factorisation, a `while_loop`), only this primitive, whose derivative is expressed
through further solves with the same state.
"""

from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.core
import jax.interpreters.ad as ad
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._misc import tree_all_finite, tree_is_complex
from ._operator.base import AbstractLinearOperator, conj
from ._operator.tangent import TangentLinearOperator
from ._solution import RESULTS
from ._solver.base import AbstractLinearSolver, rank_flags


# Which solve failed, for the error raised under `throw=True`: the user's own
# ("primal") solve, one made by the JVP rule ("tangent"), or one made by the
# transpose rule in reverse mode ("cotangent").
_KIND_PREFIX = {
    "primal": "`linear_solve` failed: ",
    "tangent": (
        "A tangent linear solve failed (one made by the JVP of `linear_solve`, "
        "e.g. under `jax.jvp`/`jax.grad`), although the primal solve had no error: "
    ),
    "cotangent": (
        "A cotangent linear solve failed (one made by the transpose of "
        "`linear_solve`, in reverse-mode differentiation): "
    ),
}


def _is_none(x: Any) -> bool:
    return x is None


def _messages(kind: str) -> list[str]:
    prefix = _KIND_PREFIX[kind]
    return [
        "" if message == "" else prefix + message
        for message in RESULTS._index_to_message
    ]


def primal_failure_message(code: int) -> str:
    """The error message of a failed primal solve with result code `code`."""
    return _messages("primal")[code]


def _linear_solve_impl(
    operator: AbstractLinearOperator,
    state: PyTree,
    vector: PyTree[Array],
    options: dict[str, Any],
    solver: AbstractLinearSolver,
    throw: bool,
    kind: str,
) -> tuple[PyTree[Array], RESULTS, dict[str, Any]]:
    solution, result, stats = solver.compute(state, vector, options)
    finite_output = tree_all_finite(solution)
    # Non-finite input makes a solver fail or return non-finite output, so the
    # inputs are only examined when one of those happened: this saves a pass over
    # the operator in the common case. (The predicate is made unbatched, so that
    # under `vmap` this stays a real branch rather than a `select`.)
    suspicious = eqxi.unvmap_any((result != RESULTS.successful) | ~finite_output)
    finite_input = lax.cond(
        suspicious,
        lambda: tree_all_finite((operator, vector)),
        lambda: jnp.array(True),
    )
    result = RESULTS.where(finite_input, result, RESULTS.nonfinite_input)
    # A solver reporting success with non-finite output hit a singular system.
    result = RESULTS.where(
        (result == RESULTS.successful) & ~finite_output, RESULTS.singular, result
    )
    failed = result != RESULTS.successful
    if throw:
        # Thread the check through the solution only: every extra leaf carried
        # through the error's `cond` costs compile time.
        solution = eqxi.branched_error_if(
            solution, failed, result._value, _messages(kind)
        )
    elif kind != "primal":
        # A failed derivative solve must not look like a valid derivative: its
        # `result` cannot be reported (the primal outputs of a JVP must not depend
        # on tangents), so it is made visible as NaN instead.
        solution = jtu.tree_map(
            lambda x: jnp.where(failed, jnp.full_like(x, jnp.nan), x), solution
        )
    return solution, result, stats


def _to_struct(x):
    if isinstance(x, jax.core.ShapedArray):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x


def _to_aval(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.core.ShapedArray(x.shape, x.dtype)
    return x


def _linear_solve_abstract_eval(operator, state, vector, options, solver, throw, kind):
    del throw
    args = jtu.tree_map(_to_struct, (operator, state, vector, options))
    out = eqx.filter_eval_shape(_linear_solve_impl, *args, solver, False, kind)
    return jtu.tree_map(_to_aval, out)


def bind(
    operator: AbstractLinearOperator,
    state: PyTree,
    vector: PyTree[Array],
    options: dict[str, Any],
    solver: AbstractLinearSolver,
    throw: bool,
    kind: str,
) -> tuple[PyTree[Array], RESULTS, dict[str, Any]]:
    return eqxi.filter_primitive_bind(
        linear_solve_p, operator, state, vector, options, solver, throw, kind
    )


def _conj_transpose_solve(operator, state, vector, options, solver, throw, complex_):
    """Solve with `A^H` (= `A^T` for real operators), reusing `state`."""
    state_t, options_t = solver.transpose(state, options)
    operator_t = operator.transpose()
    if complex_:
        state_t, options_t = solver.conj(state_t, options_t)
        operator_t = conj(operator_t)
    return bind(operator_t, state_t, vector, options_t, solver, throw, "tangent")[0]


def _nones(tree):
    return jtu.tree_map(lambda _: None, tree)


def _tree_add(*trees):
    return jtu.tree_map(lambda *xs: sum(xs[1:], xs[0]), *trees)


def _tree_neg(tree):
    return jtu.tree_map(jnp.negative, tree)


def _tree_conj(tree, complex_):
    return jtu.tree_map(jnp.conj, tree) if complex_ else tree


def _linear_solve_jvp(primals, tangents):
    operator, state, vector, options, solver, throw, kind = primals
    t_operator, _, t_vector, _, _, _, _ = tangents
    # The tangents of `state` and `options` are ignored: the solution is a function
    # of the operator and the vector alone (the state is derived from the operator;
    # the preconditioner and initial guess do not change the answer).
    solution, result, stats = bind(
        operator, state, vector, options, solver, throw, kind
    )
    has_vector_tangent = len(jtu.tree_leaves(t_vector)) > 0
    has_operator_tangent = len(jtu.tree_leaves(t_operator)) > 0
    if not (has_vector_tangent or has_operator_tangent):
        return (solution, result, stats), (
            _nones(solution),
            _nones(result),
            _nones(stats),
        )

    # Derivative of the pseudoinverse solution x = A^+ b along (V, v) (Golub and
    # Pereyra, 1973; section 4.1 of the lineax paper), with x = A^+ b and
    # z = V^H (A^+)^H x:
    #   (1) dx = A^+ (v - V x + (A^+)^H V^H (b - A x) - A z) + z
    # If A has independent columns, A^+ A = I and the z-terms cancel: eq (2).
    # If A has independent rows, b - A x = 0 and that term vanishes: eq (3).
    # If both, A^+ = A^{-1}: eq (4), dx = A^{-1} (v - V x).
    # For complex A every transpose is the conjugate transpose.
    complex_ = tree_is_complex(operator.in_structure()) or tree_is_complex(
        operator.out_structure()
    )
    dependent_rows, dependent_columns = rank_flags(solver, operator)
    # An initial guess is for the primal solve only: a solver that returns
    # `y0 + (minimum-norm correction)` would give a wrong tangent from it.
    options = {key: value for key, value in options.items() if key != "y0"}
    terms = []
    after = []
    if has_vector_tangent:
        t_vector = jtu.tree_map(
            lambda p, t: jnp.zeros_like(p) if t is None else t,
            vector,
            t_vector,
            is_leaf=_is_none,
        )
        terms.append(t_vector)
    if has_operator_tangent:
        t_operator = jtu.tree_map(
            lambda p, t: None if t is None or not eqx.is_inexact_array(p) else t,
            operator,
            t_operator,
            is_leaf=_is_none,
        )
        tangent_op = TangentLinearOperator(operator, t_operator)
        terms.append(_tree_neg(tangent_op.mv(solution)))

        # Transposed once, shared by equation (1)'s two uses.
        tangent_op_t = (
            tangent_op.transpose() if dependent_rows or dependent_columns else None
        )

        def tangent_op_h_mv(y):
            # V^H y = conj(V^T conj(y)).
            assert tangent_op_t is not None
            return _tree_conj(tangent_op_t.mv(_tree_conj(y, complex_)), complex_)

        if dependent_rows:
            residual = jtu.tree_map(lambda b, ax: b - ax, vector, operator.mv(solution))
            terms.append(
                _conj_transpose_solve(
                    operator,
                    state,
                    tangent_op_h_mv(residual),
                    options,
                    solver,
                    throw,
                    complex_,
                )
            )
        if dependent_columns:
            y = _conj_transpose_solve(
                operator, state, solution, options, solver, throw, complex_
            )
            z = tangent_op_h_mv(y)
            terms.append(_tree_neg(operator.mv(z)))
            after.append(z)
    total = _tree_add(*terms) if len(terms) > 1 else terms[0]
    t_solution = bind(operator, state, total, options, solver, throw, "tangent")[0]
    if after:
        t_solution = _tree_add(t_solution, *after)
    return (solution, result, stats), (t_solution, _nones(result), _nones(stats))


def _linear_solve_transpose(inputs, cts_out):
    operator, state, vector, options, solver, throw, kind = inputs
    del kind
    for name, value in (("operator", operator), ("state", state), ("options", options)):
        if any(isinstance(x, ad.UndefinedPrimal) for x in jtu.tree_leaves(value)):
            raise NotImplementedError(
                f"`linear_solve` is not linear in its `{name}`, so cannot be "
                "transposed with respect to it. (This is a bug: please report it.)"
            )
    ct_solution, _, _ = cts_out
    # The solve x = A^+ b is linear in b; its transpose is b_bar = (A^+)^T x_bar =
    # (A^T)^+ x_bar, a solve with the transposed operator from the same state.
    state_t, options_t = solver.transpose(state, options)
    ct_vector = bind(
        operator.transpose(),
        state_t,
        ct_solution,
        options_t,
        solver,
        throw,
        "cotangent",
    )[0]
    return (
        _nones(operator),
        _nones(state),
        ct_vector,
        _nones(options),
        _nones(solver),
        None,
        None,
    )


# Batching comes from `create_vprim`: `vmap` of the primitive binds a batched
# version whose rules are the `vmap`s of these rules, so JVPs and transposes of
# batched solves are themselves batched solves. Under `vmap` over the vector only,
# the solver's own batching makes one matrix solve of many right-hand sides.
# (`filter_primitive_transpose`'s overloads confuse pyright: it is called with the
# rule, as documented.)
linear_solve_p = eqxi.create_vprim(
    "linear_solve",
    eqxi.filter_primitive_def(_linear_solve_impl),
    eqxi.filter_primitive_def(_linear_solve_abstract_eval),
    eqxi.filter_primitive_jvp(_linear_solve_jvp),
    eqxi.filter_primitive_transpose(materialise_zeros=True)(  # pyright: ignore[reportCallIssue]
        _linear_solve_transpose
    ),
)
