"""`AbstractLinearSolver`, and the rank flags that pick the JVP equation."""

import abc
import contextlib
import contextvars
import functools as ft
import inspect
import sys
import types
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TYPE_CHECKING, TypeVar

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from .._misc import (
    check_static_float,
    instance_dict,
    lineax_class_named,
    python_number,
    select,
    Size,
    tree_all_finite,
)
from .._operator.base import (
    AbstractLinearOperator,
    check_square as check_square_operator,
    has_unit_diagonal,
    is_diagonal,
    is_lower_triangular,
    is_negative_semidefinite,
    is_positive_semidefinite,
    is_symmetric,
    is_upper_triangular,
    sizes,
)
from .._operator.identity import IdentityLinearOperator
from .._solution import RESULTS
from .._tags import (
    diagonal_tag,
    lower_triangular_tag,
    negative_semidefinite_tag,
    positive_semidefinite_tag,
    symmetric_tag,
    unit_diagonal_tag,
    upper_triangular_tag,
)


_SolverState = TypeVar("_SolverState")


# What `AbstractLinearSolver.reformulate` returns: the problem to solve instead,
# and optionally the map from its solution to the one returned.
Reformulated = (
    tuple[AbstractLinearOperator, PyTree[Array], dict[str, Any]]
    | tuple[
        AbstractLinearOperator,
        PyTree[Array],
        dict[str, Any],
        Callable[[PyTree[Array]], PyTree[Array]],
    ]
)


if TYPE_CHECKING:
    # (Hidden from type checkers: a metaclass `__call__` taking `*args, **kwargs`
    # would stand for the signature of every solver class.)
    _SolverMeta = type
else:

    class _SolverMeta(type(eqx.Module)):
        """Builds a lineax solver called with arguments seen before, each a Python
        scalar, a string or `None` (`lx.LU()`, `lx.AutoLinearSolver(well_posed=True)`),
        as Equinox's unflatten builds one: `object.__new__` and its fields set, copied
        from the first solver built with them (by Equinox's construction, which
        converted and checked them: `__init__`, converters, `__check_init__`).
        `lx.linear_solve(op, b, lx.LU())`, the usual way to write a solve, builds one
        on every call: 5 us for `LU()` and 15 us for `AutoLinearSolver(well_posed=True)`
        in a loop of their own (0.7 and 2.8 copied), and an un-jitted 10x10 solve
        with `lx.LU()` built in the call took 11 us more than with one kept (2 us
        copied: the compiled call around it empties the processor's caches,
        which makes every line cost more). Only where every field of that first
        solver is such a value (a field holding an array or a module is built
        anew each time), and only for lineax's own solver classes (a subclass
        elsewhere may build its fields otherwise). The arguments are keyed with
        their types (`True`, `1` and `1.0` apart) and a float by its `repr`
        (`-0.0` apart from `0.0`, a NaN equal to a NaN)."""

        def __call__(cls, *args: Any, **kwargs: Any):
            if not args and not kwargs:  # (the usual call, keyed by its class alone)
                key: Any = cls
            else:
                try:
                    keyed = map(_keyword_key, kwargs.items())
                    key = (cls, *map(_argument_key, args), *keyed)
                except _NotKeyed:
                    return super().__call__(*args, **kwargs)
            fields = _BUILT.get(key)
            if fields is not None:
                solver = object.__new__(cls)
                instance_dict(solver).update(fields)
                return solver
            solver = super().__call__(*args, **kwargs)
            fields = instance_dict(solver)
            if cls.__module__.startswith("lineax.") and all(
                type(value) in _FIELD_VALUES for value in fields.values()
            ):
                if len(_BUILT) >= 256:
                    _BUILT.clear()
                _BUILT[key] = dict(fields)
            return solver


class _NotKeyed(Exception):
    pass


def _argument_key(value: Any) -> tuple:
    kind = type(value)
    if kind is float or kind is complex:
        return (kind, repr(value))
    if kind not in _ARGUMENTS:
        raise _NotKeyed
    return (kind, value)


def _keyword_key(item: tuple[str, Any]) -> tuple:
    return (item[0], _argument_key(item[1]))


# The arguments `_SolverMeta` keys by value, and the field values it copies
# (shared by the solvers it builds, as the default values of fields are: the
# default norm function is one object).
_ARGUMENTS = frozenset({bool, int, float, complex, str, type(None)})
_FIELD_VALUES = _ARGUMENTS | {types.FunctionType}
_BUILT: dict[Any, dict[str, Any]] = {}


class AbstractLinearSolver(eqx.Module, Generic[_SolverState], metaclass=_SolverMeta):
    """The base class for linear solvers (and least-squares solvers).

    A solver works in two stages: `init` does the work that depends only on the
    operator (e.g. a factorisation), and `compute` solves for one right-hand side.
    `transpose` and `conj` give the state for the transposed / conjugated operator
    cheaply, which is what reverse-mode differentiation and the pseudoinverse JVP
    need: a solve is never factorised twice.

    Subclasses implement `init`, `compute`, `transpose` and `conj`, and say what
    they assume about the rank of the operator, either with `assume_full_rank()`
    or (the form in the paper) with `allow_dependent_rows(operator)` and
    `allow_dependent_columns(operator)`. Differentiation then works with no further
    code: [`lineax.linear_solve`][] picks the cheapest valid JVP equation.

    A solver says which keys of `options` it reads in `option_keys` (see there),
    and may pose its problem as another linear solve with `reformulate`.
    """

    option_keys: ClassVar[frozenset[str] | None] = None
    """The keys of `options` that this solver reads itself (a wrapper that passes
    `options` on to an inner solver need not list the inner solver's keys), e.g.
    `frozenset({"preconditioner", "y0"})` for the Krylov solvers.

    [`lineax.linear_solve`][] refuses a key that no solver declares (a typo), and
    accepts one that another solver reads, so that one `options` dict serves when
    switching solvers (as in the published lineax, which accepts any key). A
    solver that declares `"y0"` must return `y0 + A^+ (b - A y0)` from the initial
    guess `y0` (the pseudoinverse solution plus the part of `y0` in the null space
    of `A`): that is what the derivative of the solve assumes. `None` (the
    default) means undeclared: `linear_solve` then accepts every key."""

    reformulating_keys: ClassVar[frozenset[str]] = frozenset()
    """The keys of `options` with which `reformulate` poses another problem (e.g.
    `damp` for [`lineax.LSMR`][]). Only `linear_solve` poses it, for the solver
    it is given: a solver that passes `options` on to this one as an inner solver
    refuses these keys (see `check_passed_on`)."""

    @abc.abstractmethod
    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> _SolverState:
        """Do the operator-dependent work of a solve (e.g. factorise).

        **Arguments:**

        - `operator`: the linear operator.
        - `options`: a dictionary of options (solver-specific; e.g.
            `"preconditioner"`).

        **Returns:**

        The solver state: a PyTree of arrays and static data.
        """

    @abc.abstractmethod
    def compute(
        self, state: _SolverState, vector: PyTree[Array], options: dict[str, Any]
    ) -> tuple[PyTree[Array], RESULTS, dict[str, Any]]:
        """Solve for one right-hand side.

        **Arguments:**

        - `state`: from `init`.
        - `vector`: the right-hand side, a PyTree with the operator's output
            structure.
        - `options`: as passed to `init`.

        **Returns:**

        A 3-tuple `(solution, result, stats)`: the (pseudoinverse) solution, a
        [`lineax.RESULTS`][], and a dictionary of statistics.
        """

    @abc.abstractmethod
    def transpose(
        self, state: _SolverState, options: dict[str, Any]
    ) -> tuple[_SolverState, dict[str, Any]]:
        """The state and options for solving with the transposed operator, derived
        from `state` without factorising again."""

    @abc.abstractmethod
    def conj(
        self, state: _SolverState, options: dict[str, Any]
    ) -> tuple[_SolverState, dict[str, Any]]:
        """The state and options for solving with the elementwise conjugate of the
        operator."""

    def reformulate(
        self,
        operator: AbstractLinearOperator,
        vector: PyTree[Array],
        options: dict[str, Any],
    ) -> Reformulated:
        """Pose the solve as another linear solve, before `init`.

        [`lineax.linear_solve`][] calls this first and solves (and differentiates)
        the problem it returns, so that the primitive's generic derivative rules
        apply to the problem the solver really solves: e.g. damped
        [`lineax.LSMR`][] returns the least-squares problem `[A; damp I] x =
        (b, 0)`. The default returns its arguments unchanged.

        **Arguments:**

        - `operator`, `vector`, `options`: as passed to `linear_solve` (checked).

        **Returns:**

        The 3-tuple `(operator, vector, options)` to solve instead; or a 4-tuple
        whose last element maps that problem's solution to the solution returned,
        where they differ (a JAX-differentiable function, applied outside the
        primitive). E.g. [`lineax.LSMR`][] with a right preconditioner `N` solves
        `(A N) z = b` and returns `N z`: the pseudoinverse derivative rules hold
        for `z = (A N)^+ b`, not for `N z` as a solution of `A y = b` (unless `A`
        has independent columns). `init` should return the state of the posed
        problem, so that a `state=` made by `init` is the one `linear_solve`
        expects.
        """
        return operator, vector, options

    def recorded_operator_finite(self, state: _SolverState) -> Array | None:
        """Whether every entry of the operator that `state` was made from is
        finite (a boolean scalar), if `init` recorded it (see
        `operator_is_finite`); else `None`.

        If recorded, the primal solve tests this boolean with its solution,
        instead of scanning the operator's entries again at every solve: with a
        state reused across right-hand sides, that O(n^2) scan would be most of
        an O(n^2) solve. A non-finite operator then fails the solve, which is
        reported as `RESULTS.nonfinite_input` (the failure path examines the
        operator), as if the operator had been scanned. The default is `None`:
        the operator's arrays are tested with the solution, at every primal
        solve.
        """
        del state
        return None

    def part_read(
        self, operator: AbstractLinearOperator, other: AbstractLinearOperator
    ) -> AbstractLinearOperator:
        """`other`, an operator of `operator`'s structure (a tangent of it), cut
        down to the part of `operator` that this solver reads.

        The solution depends on that part only, and so must its derivative: the JVP
        of `linear_solve` applies this to the operator's tangent. E.g.
        [`lineax.Diagonal`][] reads only the diagonal, so the rest of a tangent
        (`jax.grad` with respect to a whole matrix tagged diagonal) changes nothing
        and is dropped. The default: the whole of `other` (a solver that reads the
        whole operator).
        """
        del operator
        return other

    def solved_operator(
        self, operator: AbstractLinearOperator
    ) -> AbstractLinearOperator:
        """The operator as this solver solves it: what the residuals of a solve
        with it (`lx.Woodbury`'s refinement step) and the products with it in the
        JVP of a least-squares solve need.

        The default: the part of `operator` that this solver reads,
        `part_read(operator, operator)`. A solver that supplies a constant part of
        its own overrides it: [`lineax.Triangular`][] under `unit_diagonal_tag`
        adds the unit diagonal, which tangents lack; a structured solver builds it
        from its parts as their solvers solve them.
        """
        return self.part_read(operator, operator)

    def has_full_rank(self, state: _SolverState) -> Array | None:
        """For the JVP of `linear_solve`: a boolean scalar array saying that the
        operator as solved has full rank (`min(m, n)`), tested by the
        factorisation in `state`; or `None`, the default: not known.

        Where it is true, the JVP drops the terms of the pseudoinverse derivative
        that then vanish, instead of computing them as rounding: for a wide
        operator the residual `b - A x` (rounded to `eps |A| |x|`, which the JVP
        multiplies by `|A^+|^2`), for a tall one `(I - A^+ A) z` (rounded to
        `eps |A^+| |A| |z|`). Both vanish near such an operator too, so higher
        derivatives are exact. [`lineax.SVD`][] overrides this for non-square
        operators; solvers whose `assume_full_rank()` is true have no such terms.
        """
        del state
        return None

    def initial_guess(self, operator: AbstractLinearOperator, y0: PyTree) -> Any:
        """The initial guess `g` that the solution depends on, given the `y0`
        option: a solver whose answer is `g + A^+ (b - A g)` (the pseudoinverse
        solution plus the part of `g` in the null space of `A`) returns `g`, a
        linear function of `y0`; one whose answer does not depend on `y0` returns
        `None`. The JVP of `linear_solve` differentiates the solution as such
        (with respect to `y0` too), where `A` may have dependent columns.

        The default: `y0` if this solver declares reading it (see
        `option_keys`), as lineax's Krylov solvers do, else `None`. A solver
        passing `y0` on to inner solvers says what they make of it (e.g.
        [`lineax.BlockDiagonal`][], one guess per block).
        """
        del operator
        return y0 if reads_option(self, "y0") else None

    def assume_full_rank(self) -> bool:
        """Whether this solver only handles operators of full rank (independent rows
        if wide, independent columns if tall, both if square).

        Either override this, or both of `allow_dependent_rows` and
        `allow_dependent_columns`.
        """
        if _overrides(self, "allow_dependent_rows") or _overrides(
            self, "allow_dependent_columns"
        ):
            raise NotImplementedError(
                f"{type(self).__name__} defines `allow_dependent_rows`/"
                "`allow_dependent_columns`; call those with the operator instead of "
                "`assume_full_rank()`."
            )
        raise NotImplementedError(
            f"{type(self).__name__} must implement `assume_full_rank()` (or both "
            "`allow_dependent_rows(operator)` and `allow_dependent_columns(operator)`)"
            " so that `linear_solve` knows which derivative formula is valid."
        )

    def allow_dependent_rows(self, operator: AbstractLinearOperator) -> bool:
        """Whether this solver can handle an operator with linearly dependent rows
        (e.g. any tall matrix). If `False`, the JVP may assume independent rows."""
        return (not self.assume_full_rank()) or operator.out_size() > operator.in_size()

    def allow_dependent_columns(self, operator: AbstractLinearOperator) -> bool:
        """Whether this solver can handle an operator with linearly dependent
        columns (e.g. any wide matrix). If `False`, the JVP may assume independent
        columns."""
        return (not self.assume_full_rank()) or operator.in_size() > operator.out_size()


# (A context variable, not a global: tracing in several threads at once must not
# see each other's setting.)
_statistics_unused = contextvars.ContextVar("lineax_statistics_unused", default=False)


@contextlib.contextmanager
def statistics_unused():
    """Within it, `compute` is traced for a solve whose statistics nothing reads
    (see `_primitive._compute_traced`): a solver may then leave out statistics
    that dead-code elimination cannot remove (a Krylov solver's residual
    history, a carry of its loops)."""
    token = _statistics_unused.set(True)
    try:
        yield
    finally:
        _statistics_unused.reset(token)


def statistics_wanted() -> bool:
    """`False` while `compute` is traced for a solve whose statistics are unused
    (see `statistics_unused`)."""
    return not _statistics_unused.get()


def declared_option_keys() -> frozenset[str]:
    """The `options` keys that some solver class declares reading (its
    `option_keys`): those of lineax's solvers, and of any user solver that
    declares them. Walked afresh on each call, as classes may be defined later."""
    keys: set[str] = set()
    classes = [AbstractLinearSolver]
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        keys.update(cls.option_keys or ())
    return frozenset(keys)


def check_passed_on(
    solvers: tuple[AbstractLinearSolver, ...], options: dict[str, Any], who: str
) -> None:
    """Raise a ValueError if `options`, which the solver `who` passes on to its
    inner `solvers`, holds a key with which one of them would pose another problem
    (its `reformulating_keys`).

    `linear_solve` poses that problem (e.g. LSMR's damped solve as the
    least-squares solve of `[A; damp I]`) before `init`, and differentiates it,
    for the solver it is given only. An inner solver handed the key solves a
    damped problem for each part of the operator: not the damped problem of the
    whole (`Normal`, `Woodbury`, `Kronecker`), with derivatives that ignored
    `damp` and were those of the undamped solution, or failed inside JAX's
    closure conversion (`BlockDiagonal`, whose value alone was right)."""
    for solver in solvers:
        # (`None` is the default of an option: no other problem.)
        keys = sorted(
            k for k in solver.reformulating_keys if options.get(k) is not None
        )
        if keys:
            name = type(solver).__name__
            given = ", ".join(f"`{key}`" for key in keys)
            raise ValueError(
                f"`lx.{who}` passes `options` on to its inner solver `lx.{name}`, "
                f"which would pose another problem from {given} (e.g. a damped "
                "least-squares problem): only `linear_solve` can pose it, for the "
                "solver it is given. Solve the whole operator with "
                f"`lx.{name}` and these options instead (for a block-diagonal "
                "operator, that is the damped solve of each block)."
            )


def reads_option(solver: AbstractLinearSolver, key: str) -> bool:
    """Whether `solver` declares reading the option `key`."""
    return key in (solver.option_keys or ())


def _overrides(solver: AbstractLinearSolver, name: str) -> bool:
    return getattr(type(solver), name) is not getattr(AbstractLinearSolver, name)


def rank_flags(
    solver: AbstractLinearSolver, operator: AbstractLinearOperator
) -> tuple[bool, bool]:
    """`(dependent_rows, dependent_columns)`: which the solver may meet, from
    whichever form of the rank flags it implements."""
    if _overrides(solver, "allow_dependent_rows") or _overrides(
        solver, "allow_dependent_columns"
    ):
        return (
            bool(solver.allow_dependent_rows(operator)),
            bool(solver.allow_dependent_columns(operator)),
        )
    full_rank = bool(solver.assume_full_rank())
    in_size, out_size = sizes(operator)
    rows = (not full_rank) or out_size > in_size
    columns = (not full_rank) or in_size > out_size
    return rows, columns


def inverse_tags(
    solver: AbstractLinearSolver, operator: AbstractLinearOperator
) -> frozenset:
    """The tags that hold for the (pseudo)inverse of `operator`, as solved by
    `solver`: what [`lineax.invert`][] keeps.

    Symmetry, semidefiniteness and diagonality hold for the pseudoinverse too. A
    triangular matrix has a triangular inverse only if it is nonsingular, so the
    triangular tags are kept when `solver` assumes full rank, or when the operator
    has a unit diagonal (then it is nonsingular, and so is its unit diagonal
    inverse). Tridiagonal operators have dense inverses: that tag is dropped.
    """
    in_size, out_size = sizes(operator)
    if in_size != out_size:
        return frozenset()
    tags = set()
    for predicate, tag in (
        (is_symmetric, symmetric_tag),
        (is_positive_semidefinite, positive_semidefinite_tag),
        (is_negative_semidefinite, negative_semidefinite_tag),
        (is_diagonal, diagonal_tag),
    ):
        if predicate(operator):
            tags.add(tag)
    lower = is_lower_triangular(operator)
    upper = is_upper_triangular(operator)
    unit = (lower or upper) and has_unit_diagonal(operator)
    if unit or not any(rank_flags(solver, operator)):
        if lower:
            tags.add(lower_triangular_tag)
        if upper:
            tags.add(upper_triangular_tag)
    if unit:
        tags.add(unit_diagonal_tag)
    return frozenset(tags)


def embed_like(
    operator: AbstractLinearOperator, flat: AbstractLinearOperator
) -> AbstractLinearOperator:
    """`flat`, an operator on flat vectors of `operator`'s sizes, given `operator`'s
    input and output structures (for `part_read`)."""
    return (
        IdentityLinearOperator(flat.out_structure(), operator.out_structure())
        @ flat
        @ IdentityLinearOperator(operator.in_structure(), flat.in_structure())
    )


def static_number(kind: Any, **kwargs: Any) -> Any:
    """`eqx.field(static=True, ...)` for a solver's numeric parameter of type
    `kind` (a tolerance, a step count): a NumPy scalar such as
    `np.finfo(np.float32).eps` or `np.int64(100)`, or a concrete 0-d JAX array, is
    stored as a Python number. Static data is hashed and compared by the
    compilation cache, and the published lineax accepts these."""

    def convert(value: Any) -> Any:
        return python_number(value)

    # The constructor's signature shows the converter's parameter type.
    convert.__annotations__ = {"value": kind, "return": kind}
    return eqx.field(static=True, converter=convert, **kwargs)


def check_rcond(rcond: Any) -> None:
    """Raise a TypeError or ValueError unless `rcond` (a relative cutoff of
    singular values) is None or a nonnegative real number."""
    if rcond is None:
        return
    # (A traced `rcond` failed in `rcond >= 0` with JAX's TracerBoolConversionError.)
    check_static_float(rcond, "rcond")
    if not rcond >= 0:
        raise ValueError(f"`rcond` must be nonnegative or None, got {rcond}.")


def check_solver(solver: Any, argument: str) -> None:
    """Raise a TypeError naming `argument` unless `solver` is a solver instance;
    for a solver class (`lx.LU` for `lx.LU()`), say so."""
    if isinstance(solver, AbstractLinearSolver):
        return
    if isinstance(solver, type) and issubclass(solver, AbstractLinearSolver):
        name = solver.__name__
        raise TypeError(
            f"`{argument}` must be a solver instance, got the class `{name}`: did "
            f"you mean `lx.{name}()` (with its arguments, e.g. `rtol` and `atol` "
            "for an iterative solver)?"
        )
    hint = ""
    if _builds_solver(solver):
        # `lx.NormalCG`, a function that builds a solver (as in lineax 0.1.1).
        hint = f" `{solver.__name__}`: did you mean `lx.{solver.__name__}(...)`"
    elif isinstance(solver, str):
        named = lineax_class_named(solver, AbstractLinearSolver, "LinearSolver")
        example = "LU()" if named is None else f"{named.__name__}({_args(named)})"
        hint = f" {solver!r}: solvers are objects, e.g. `lx.{example}`"
    raise TypeError(
        f"`{argument}` must be a `lineax.AbstractLinearSolver`, got "
        f"{type(solver).__name__}{hint}."
    )


def _builds_solver(function: Any) -> bool:
    """Whether `function` is a public lineax function that returns a solver."""
    name = getattr(function, "__name__", "")
    if not inspect.isfunction(function) or (
        getattr(sys.modules.get("lineax"), name, None) is not function
    ):
        return False
    returns = inspect.signature(function).return_annotation
    return isinstance(returns, type) and issubclass(returns, AbstractLinearSolver)


def _args(cls: type) -> str:
    """`...` where building `cls` needs arguments, else nothing (for messages)."""
    parameters = inspect.signature(cls).parameters.values()
    return "..." if any(p.default is p.empty for p in parameters) else ""


def check_lapack_dtype(operator: AbstractLinearOperator, solver_name: str) -> None:
    """Raise a TypeError if `operator` is in a half-precision dtype: LAPACK and
    cuSOLVER have no half-precision factorisations, and JAX's would fail with a
    `KeyError` deep inside its lowering."""
    for struct in jax.tree_util.tree_leaves(operator.in_structure()):
        dtype = jnp.dtype(struct.dtype)
        if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
            raise TypeError(
                f"`lx.{solver_name}` cannot factorise a {dtype.name} operator: "
                "LAPACK and cuSOLVER (like NumPy's `linalg`) have no half-precision "
                "factorisations. Convert the operator and the vector to float32, "
                "or use an iterative solver (e.g. `lx.GMRES`, or `lx.CG` for a "
                f"positive definite operator), which runs in {dtype.name}."
            )


def check_square(operator: AbstractLinearOperator, solver_name: str) -> None:
    """Raise a ValueError if `operator` is not square, suggesting what to use."""
    check_square_operator(
        operator,
        f"lx.{solver_name}",
        "For least-squares or minimum-norm solutions use `lx.QR()` (full rank), "
        "`lx.SVD()` (any rank) or `lx.AutoLinearSolver(well_posed=False)`.",
    )


def check_tag(ok: bool, solver_name: str, what: str, tag_hint: str) -> None:
    """Raise a ValueError if the operator lacks the structure a solver needs."""
    if not ok:
        # The example names the first tag without its backticks: it sits inside
        # the example's own code span.
        first_tag = tag_hint.split(" or ")[0].strip("`")
        raise ValueError(
            f"`lx.{solver_name}` requires the operator to be {what}, which is known "
            f"only from its tags; mark it with {tag_hint} (e.g. "
            f"`lx.TaggedLinearOperator(operator, {first_tag})`), or "
            "use `lx.AutoLinearSolver`, which picks a solver from the tags."
        )


def is_own_array(matrix: Array, operator: AbstractLinearOperator) -> bool:
    """Whether `matrix`, `operator.as_matrix()`, is one of the operator's own
    arrays (a `MatrixLinearOperator`'s), which an `init` may read besides
    factorising it at no cost. A computed matrix (a function operator's, a
    Jacobian: Diffrax's implicit solvers, Optimistix's Newton and Gauss-Newton)
    read again is computed a second time by XLA (LAPACK's `getrf` and `geqrf`
    overwrite their own copy), so LU and QR read their factors instead."""
    return any(matrix is leaf for leaf in jax.tree_util.tree_leaves(operator))


def operator_is_finite(matrix: Array) -> Array:
    """Whether every entry of `matrix` is finite (a boolean scalar): recorded by
    a direct solver's `init`, next to the O(n^3) factorisation, so that each
    solve from the state tests one boolean (see
    `AbstractLinearSolver.recorded_operator_finite`) instead of scanning the
    matrix again. (A non-finite entry does not always
    reach the solution: `[[inf, 2], [2, 4]]` factorises to `U = [[inf, 2], [0,
    4]]`, from which substitution gives a finite `x`.)"""
    return tree_all_finite(matrix)


def inf_at_zero_pivots(x: Array, pivots: Array) -> Array:
    """`x`, with infinity where a pivot is exactly zero: a solution computed from
    a triangular factor with diagonal `pivots` (of `x`'s length, or broadcasting
    against `x`'s rows), made visibly singular.

    A factor is singular when some pivot is exactly zero (LAPACK's `info > 0`
    from `getrf`/`potrf`/`trtrs`). Rather than a reduction of its own, that test
    joins the finiteness test of the solution which `linear_solve` makes anyway
    (and which reports a non-finite solution as `RESULTS.singular`): one
    elementwise `select`, fused with the solve's output, instead of a separately
    compiled reduction. (Substitution alone does not always give a non-finite
    answer: BLAS skips the division of a zero right-hand side.)

    Infinity, not NaN: a NaN in the output is an error under `jax_debug_nans`
    even with `throw=False` (JAX checks a program's outputs before the result
    code is read), and a singular LU solve returned `[-inf, nan]` and raised
    `FloatingPointError`, where lineax 0.1.1 returned `[-inf, inf]` and
    `singular`. The infinity is a constant selected, so no infinity or NaN is
    computed in a nonsingular solve (`jax_debug_infs`), not even without `jit`.

    The test reads `x` as well as the pivots (`pivots + min(|x|, 0)`, which is
    `pivots` wherever `x` is finite; where it is not, the entry is not finite
    either way), for XLA: a test of the pivots alone is loop-invariant where a
    factorisation is kept across a loop of solves (Diffrax's implicit solvers:
    the Jacobian's LU in the Newton loop), and XLA hoisted it out of the loop
    into kernels of its own (Kvaerno5 on Robertson's problem: 2 kernels, and
    the division, `x / (pivots != 0)` as it was, one more in the loop). And a
    `select` of a constant is cheap enough for XLA to fuse into each reader of
    the solution, where a division was a kernel of its own (Optimistix's
    Newton and GaussNewton: one per step).

    Deliberately not a threshold on the pivots' ratio: that ratio changes under
    row and column scaling, which LU, QR, Cholesky and substitution handle
    without losing accuracy, so any threshold calls some accurately solved,
    badly scaled systems singular. Ill-conditioning is reported instead by the
    reciprocal condition estimate `stats["rcond"]`, which never changes `result`.
    """
    zero = jnp.minimum(jnp.abs(x), 0).astype(x.dtype)
    nonzero = (jnp.broadcast_to(pivots, x.shape) + zero) != 0
    if all(isinstance(d, int) for d in x.shape):
        inf = np.full(x.shape, np.inf, x.dtype)
    else:
        inf = jnp.full(x.shape, np.inf, x.dtype)
    return jax.lax.select(nonzero, x, inf)


# Hager's iteration usually settles in two steps (Higham 1988, section 4), and
# LAPACK's `xLACN2` in at most five. A fixed, unrolled count keeps the estimate a
# straight line of triangular solves: no `while_loop` to compile.
_HAGER_STEPS = 2
# Up to this size the inverse is formed instead (see `rcond_estimate`).
_EXACT_BELOW = 32


def rcond_is_exact(n: Size) -> bool:
    """Whether `rcond_estimate` forms the inverse for a size `n` (an O(n^3)
    solve of `n` right-hand sides) rather than estimating its norm in O(n^2)."""
    return isinstance(n, int) and n <= _EXACT_BELOW


def norm1(matrix: Array, axis: int = 0) -> Array:
    """The 1-norm (maximum absolute column sum) of a 2-D array; with `axis=1`,
    that of its transpose (the maximum absolute row sum).

    (`norm1(matrix, axis=1)` rather than `norm1(matrix.T)`: next to
    `norm1(matrix)`, XLA then computes `abs(matrix)` once for both sums, where
    `abs(matrix.T)` was a transposed n x n copy of its own. LU's `init`, n = 100:
    2.03 -> 1.04 n^2 temporaries; `lu_factor`: 1.0.)"""
    column_sums = jnp.sum(jnp.abs(matrix), axis=axis)
    if column_sums.size == 0:
        return jnp.zeros((), column_sums.dtype)
    # (Not `jnp.max(..., initial=0)`: where the norm has two consumers (LU's
    # state and its condition estimate), XLA:CPU compiled that maximum with 0
    # as a kernel of its own.)
    return jnp.max(column_sums)


def _sign(y: Array) -> Array:
    # The "sign" of Hager's method, `y / |y|`, with 1 for zero; also for complex.
    absy = jnp.abs(y)
    safe = select(absy == 0, 1, absy).astype(y.dtype)
    return select(absy == 0, jnp.ones_like(y), y / safe)


# Jitted so that its trace is cached (keyed on shapes, dtypes and the static
# arguments): a solve's `compute` is traced several times (abstract evaluation,
# lowering, each derivative rule), and the estimate is a long straight line of
# small operations. Under an outer `jit` whose caller ignores `stats`, XLA removes
# it altogether.
@ft.partial(jax.jit, static_argnames=("solve", "static", "n", "dtype", "inverse"))
def rcond_estimate(
    norm: Array,
    arrays: PyTree[Array],
    *,
    solve: Callable[[Any, Any, Array, bool], Array],
    static: Any,
    n: Size,
    dtype: Any,
    inverse: Callable[[Any, Any, Array], Array] | None = None,
) -> Array:
    """Estimate the reciprocal 1-norm condition number `1 / (|A|_1 |A^{-1}|_1)`
    in O(n^2) from a factorisation, as LAPACK's `xGECON`/`xPOCON`/`xTRCON` do.

    `|A^{-1}|_1` is estimated from below by Hager's method (W. W. Hager,
    "Condition estimates", SIAM J. Sci. Stat. Comput. 5, 1984) with Higham's
    extra test vector (N. J. Higham, "FORTRAN codes for estimating the one-norm
    of a real or complex matrix", ACM TOMS 14, 1988), so the estimate is at least
    the true reciprocal condition number, and in practice within a factor of a
    few of it. Zero for an exactly singular factorisation.

    **Arguments:**

    - `norm`: `|A|_1`, computed from `A` itself.
    - `arrays`: the factors (a PyTree of arrays), passed to `solve`.
    - `solve`: a module-level function (it is a static, hashed argument):
        `solve(arrays, static, X, adjoint)` returns `A^{-1} X` (`adjoint=False`)
        or `A^{-H} X` (`adjoint=True`) for a 2-D `X` of shape `(n, k)`.
    - `static`: hashable data passed to `solve` (e.g. whether to transpose).
    - `n`: the size of `A`.
    - `dtype`: the dtype of the factors.
    - `inverse`: optionally, a module-level function: `inverse(arrays, static,
        I)`, given the identity `I`, returns `A^{-1}` up to a permutation of its
        rows or columns (which leaves `|A^{-1}|_1` unchanged), used for a small
        `A` instead of `solve(arrays, static, I, False)` (e.g. without the
        pivoting's permutation of `I`, a kernel of its own).

    **Returns:**

    A real scalar in `[0, 1]` (up to rounding), or NaN for non-finite factors.
    """
    real = jnp.finfo(dtype).dtype
    if n == 0:
        return jnp.ones((), real)
    # (A symbolic size, from `jax.export.symbolic_shape`, may be small or not: the
    # estimate, which holds for any size.)
    if rcond_is_exact(n):
        # Small: the exact `|A^{-1}|_1` from the inverse, one solve of `n`
        # right-hand sides, costs less than the estimate's sequence of solves.
        # (The identity as a constant: made with `jnp.eye`, XLA:CPU computed it
        # in a kernel of its own.)
        identity = jnp.asarray(np.eye(n, dtype=dtype))
        if inverse is None:
            estimate = norm1(solve(arrays, static, identity, False))
        else:
            estimate = norm1(inverse(arrays, static, identity))
        return _rcond(norm, estimate, real)
    # Hager's start `ones / n`, and Higham's alternating vector
    # `(-1)^i (1 + i / (n - 1))`, which catches what the iteration misses. (With
    # NumPy: constants of the program, not computed in it; computed in it only
    # for a symbolic size, which no NumPy array has.)
    xp = np if isinstance(n, int) else jnp
    i = xp.arange(n, dtype=real)
    alt = xp.where(i % 2 == 0, 1, -1).astype(real) * (1 + i / xp.maximum(n - 1, 1))
    start = xp.stack([xp.full((n,), 1, real) / n, alt], axis=1).astype(dtype)
    y = solve(arrays, static, jnp.asarray(start), False)
    absy = jnp.sum(jnp.abs(y), axis=0)
    estimate = jnp.maximum(absy[0], 2 * absy[1] / (3 * n))
    yk = y[:, :1]
    for _ in range(_HAGER_STEPS):
        z = solve(arrays, static, _sign(yk), True)
        j = jnp.argmax(jnp.abs(z[:, 0]))
        # The unit vector `e_j`, elementwise (a scatter compiles to larger
        # kernels on XLA:CPU).
        e_j = (jnp.arange(n) == j)[:, None].astype(dtype)
        yk = solve(arrays, static, e_j, False)
        estimate = jnp.maximum(estimate, jnp.sum(jnp.abs(yk)))
    return _rcond(norm, estimate, real)


def _rcond(norm: Array, estimate: Array, real: Any) -> Array:
    """`1 / (norm * estimate)`: zero for a singular factorisation, whose solves
    (hence `estimate`) are not finite, NaN for a non-finite `norm`."""
    norm = norm.astype(real)
    estimate = estimate.astype(real)
    # `estimate` is read once: XLA:CPU fuses a reduction (the estimate) into
    # its consumer only where it has one.
    rcond = (1 / select(norm == 0, 1, norm)) / estimate
    # An exactly singular factor makes the solves, hence `estimate`, inf (then
    # `rcond` is zero) or NaN.
    singular = (norm == 0) | jnp.isnan(rcond)
    rcond = select(singular, jnp.zeros((), real), rcond)
    return select(jnp.isfinite(norm), rcond, jnp.full((), jnp.nan, real))
