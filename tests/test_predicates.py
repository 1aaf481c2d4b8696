"""Structure predicates, tags and their transposition, and user operator classes."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import raises_message
from helpers import (
    _fun,
    _jac,
    _mat,
    _pyt,
    _S,
    assert_close,
    diag,
    lower,
    nsd,
    PREDICATES,
    psd,
    random_matrix,
    sym,
    tri,
    true_predicates,
    unit,
    upper,
    UserMatrixOperator,
)

import lineax as lx


f32, f64, c128 = jnp.float32, jnp.float64, jnp.complex128


#
# Predicates and tags.
#


_ALL = set(PREDICATES)

# (operator thunk, names of the predicates that hold). Thunks: built per test.
PREDICATE_CASES = {
    "matrix_untagged": (lambda: _mat(), set()),
    "matrix_sym": (lambda: _mat(sym), {"symmetric"}),
    "matrix_psd": (lambda: _mat(psd), {"symmetric", "psd"}),
    "matrix_nsd": (lambda: _mat(nsd), {"symmetric", "nsd"}),
    "matrix_diag": (
        lambda: _mat(diag),
        {"symmetric", "diagonal", "tridiagonal", "lower", "upper"},
    ),
    "matrix_tri": (lambda: _mat(tri), {"tridiagonal"}),
    "matrix_unit_lower": (lambda: _mat([lower, unit]), {"lower", "unit"}),
    "matrix_1x1": (lambda: _mat(n=1), {"diagonal"}),
    "pytree_lower": (lambda: _pyt(lower), {"lower"}),
    "function_upper": (lambda: _fun(upper), {"upper"}),
    "jacobian_psd": (lambda: _jac(psd), {"symmetric", "psd"}),
    "diagonal": (
        lambda: lx.DiagonalLinearOperator(jnp.ones(3)),
        {"symmetric", "diagonal", "tridiagonal", "lower", "upper"},
    ),
    "tridiagonal": (
        lambda: lx.TridiagonalLinearOperator(jnp.ones(3), jnp.ones(2), jnp.ones(2)),
        {"tridiagonal"},
    ),
    "identity": (lambda: lx.IdentityLinearOperator(_S), _ALL - {"nsd"}),
    "tagged_adds": (
        lambda: lx.TaggedLinearOperator(_mat(sym), psd),
        {"symmetric", "psd"},
    ),
    "tagged_single_and_iterable": (
        lambda: lx.TaggedLinearOperator(_fun(), [lower, unit]),
        {"lower", "unit"},
    ),
    "add_sym_sym": (lambda: _mat(sym) + _fun(sym), {"symmetric"}),
    "add_sym_plain": (lambda: _mat(sym) + _fun(), set()),
    "add_psd_psd": (lambda: _mat(psd) + _fun(psd), {"symmetric", "psd"}),
    "add_psd_nsd": (lambda: _mat(psd) + _mat(nsd), {"symmetric"}),
    "add_lower_diag": (lambda: _mat(lower) + _mat(diag), {"lower"}),
    "add_unit_unit": (lambda: _mat([lower, unit]) + _mat([lower, unit]), {"lower"}),
    "sub_psd_nsd": (lambda: _mat(psd) - _mat(nsd), {"symmetric", "psd"}),
    "neg_psd": (lambda: -_mat(psd), {"symmetric", "nsd"}),
    "neg_nsd": (lambda: -_mat(nsd), {"symmetric", "psd"}),
    "neg_unit_lower": (lambda: -_mat([lower, unit]), {"lower"}),
    "mul_psd_array": (lambda: _mat(psd) * jnp.array(2.0), {"symmetric"}),
    "mul_psd_positive_python": (lambda: _mat(psd) * 2.0, {"symmetric", "psd"}),
    "mul_psd_negative_python": (lambda: -3 * _mat(psd), {"symmetric", "nsd"}),
    "mul_unit_lower": (lambda: _mat([lower, unit]) * 2.0, {"lower"}),
    "div_nsd_array": (lambda: _mat(nsd) / jnp.array(2.0), {"symmetric"}),
    "div_nsd_negative_python": (lambda: _mat(nsd) / -2.0, {"symmetric", "psd"}),
    "compose_diag_diag": (
        lambda: _mat(diag) @ lx.DiagonalLinearOperator(jnp.ones(3)),
        {"symmetric", "diagonal", "tridiagonal", "lower", "upper"},
    ),
    "compose_lower_lower": (lambda: _mat(lower) @ _fun(lower), {"lower"}),
    "compose_unit_lower": (
        lambda: _mat([lower, unit]) @ _mat([lower, unit]),
        {"lower", "unit"},
    ),
    "compose_lower_upper": (lambda: _mat(lower) @ _mat(upper), set()),
    "compose_diag_tri": (lambda: _mat(diag) @ _mat(tri), {"tridiagonal"}),
    "compose_sym_sym": (lambda: _mat(sym) @ _mat(sym), set()),
    "compose_psd_psd": (lambda: _mat(psd) @ _mat(psd), set()),
    "tangent_psd": (
        lambda: lx.TangentLinearOperator(_mat(psd), _mat(psd)),
        {"symmetric"},
    ),
    "tangent_unit_lower": (
        lambda: lx.TangentLinearOperator(_mat([lower, unit]), _mat([lower, unit])),
        {"lower"},
    ),
}


@pytest.mark.parametrize("name", list(PREDICATE_CASES))
def test_predicates(name):
    thunk, expected = PREDICATE_CASES[name]
    op = thunk()
    assert true_predicates(op) == expected
    for pred in PREDICATES.values():
        assert type(pred(op)) is bool
    # Decided at trace time from the type: the same under jit, on traced arrays.
    params, static = eqx.partition(op, eqx.is_array)

    def traced(params):
        assert true_predicates(eqx.combine(params, static)) == expected
        return 0

    jax.jit(traced)(params)
    # ... and through conj and materialise.
    assert true_predicates(lx.conj(op)) == expected
    assert true_predicates(lx.materialise(op)) == expected


def test_compose_unit_diagonal_needs_triangular():
    a = lx.MatrixLinearOperator(jnp.ones((2, 2)), unit)
    composed = a @ a
    assert np.allclose(np.diagonal(composed.as_matrix()), 2.0)
    assert not lx.has_unit_diagonal(composed)


_TRANSPOSE_SWAPS = {"lower": "upper", "upper": "lower"}

_TAGGED_THUNKS = {
    "matrix": lambda tags: _mat(tags),
    "pytree": lambda tags: _pyt(tags),
    "function": lambda tags: _fun(tags),
    "jacobian": lambda tags: _jac(tags),
    "jacobian_fwd": lambda tags: _jac(tags, "fwd"),
    "jacobian_bwd": lambda tags: _jac(tags, "bwd"),
    "tagged": lambda tags: lx.TaggedLinearOperator(_mat(), tags),
    "neg": lambda tags: -_mat(tags),
    "mul": lambda tags: _mat(tags) * jnp.array(2.0),
    "add": lambda tags: _mat(tags) + _fun(tags),
    "tangent": lambda tags: lx.TangentLinearOperator(_mat(tags), _mat(tags)),
}


@pytest.mark.parametrize("kind", list(_TAGGED_THUNKS))
@pytest.mark.parametrize(
    "tags", [(lower,), (upper,), (lower, unit), (sym,), (psd,), (nsd,), (tri,), (diag,)]
)
def test_predicates_follow_transpose(kind, tags):
    op = _TAGGED_THUNKS[kind](tags)
    before = true_predicates(op)
    after = true_predicates(op.T)
    assert after == {_TRANSPOSE_SWAPS.get(p, p) for p in before}
    assert true_predicates(op.T.T) == before
    assert true_predicates(lx.conj(op).T) == after
    assert_close(op.T.as_matrix(), np.asarray(op.as_matrix()).T, f64)


def test_transpose_tags():
    assert lx.transpose_tags(frozenset()) == frozenset()
    assert lx.transpose_tags(lower) == frozenset([upper])
    assert lx.transpose_tags([upper]) == frozenset([lower])
    assert lx.transpose_tags((lower, unit)) == frozenset([upper, unit])
    assert lx.transpose_tags({lower, upper}) == frozenset([lower, upper])
    every = frozenset([sym, diag, tri, unit, psd, nsd])
    assert lx.transpose_tags(every) == every
    assert isinstance(lx.transpose_tags([sym]), frozenset)
    # Tags are stored as frozensets whichever way they are passed.
    assert _mat(sym).tags == frozenset([sym])
    assert _mat([sym, psd]).tags == frozenset([sym, psd])
    assert lx.TaggedLinearOperator(_mat(), (t for t in [psd])).tags == frozenset([psd])
    assert lx.FunctionLinearOperator(lambda x: x, _S, {psd}).tags == frozenset([psd])
    assert {repr(t) for t in [sym, diag, lower]} == {
        "symmetric_tag",
        "diagonal_tag",
        "lower_triangular_tag",
    }


class _UserTag:
    def __init__(self, name):
        self.name = name


def test_transpose_tags_rules_user_appendable():
    my_tag, my_transposed_tag = _UserTag("mine"), _UserTag("mine_transposed")
    rules = lx.transpose_tags_rules
    original = list(rules)

    def rule(tags):
        if my_tag in tags:
            return my_transposed_tag
        return None

    rules.append(rule)
    rules.append(lambda tags: [psd] if my_transposed_tag in tags else None)
    try:
        assert my_transposed_tag in lx.transpose_tags([my_tag, lower])
        assert upper in lx.transpose_tags([my_tag, lower])
        assert psd in lx.transpose_tags([my_transposed_tag])
        matrix_t = _mat([my_tag]).T
        tagged_t = lx.TaggedLinearOperator(_fun(), my_tag).T
        assert isinstance(matrix_t, lx.MatrixLinearOperator)
        assert isinstance(tagged_t, lx.TaggedLinearOperator)
        assert my_transposed_tag in matrix_t.tags
        assert my_transposed_tag in tagged_t.tags
    finally:
        rules[:] = original
    assert lx.transpose_tags_rules == original
    assert my_transposed_tag not in lx.transpose_tags([my_tag])


def test_transpose_tags_rules_user_swap():
    my_lower, my_upper = _UserTag("my_lower"), _UserTag("my_upper")
    original = list(lx.transpose_tags_rules)
    lx.transpose_tags_rules.append(lambda tags: my_upper if my_lower in tags else None)
    lx.transpose_tags_rules.append(lambda tags: my_lower if my_upper in tags else None)
    try:
        assert lx.transpose_tags([my_lower]) == frozenset([my_upper])
    finally:
        lx.transpose_tags_rules[:] = original


#
# User operator classes.
#


_UserOperator = UserMatrixOperator


class _UnregisteredOperator(_UserOperator):
    pass


class _SymmetricOperator(_UserOperator):
    pass


lx.is_symmetric.register(_SymmetricOperator)(lambda op: True)
lx.is_positive_semidefinite.register(_SymmetricOperator)(lambda op: True)


def test_user_operator_unregistered():
    matrix = random_matrix(np.random.default_rng(0), 3, 3, f64)
    op = _UnregisteredOperator(jnp.asarray(matrix))
    assert true_predicates(op) == set()
    assert_close(lx.diagonal(op), np.diagonal(matrix), f64)
    assert_close(
        list(lx.tridiagonal(op)), [np.diagonal(matrix, k) for k in (0, -1, 1)], f64
    )
    assert_close(lx.materialise(op).as_matrix(), matrix, f64)
    assert_close(lx.linearise(op).as_matrix(), matrix, f64)
    assert_close(lx.conj(op).as_matrix(), matrix, f64)
    x = jnp.arange(3.0)
    assert_close((op + op).mv(x), 2 * matrix @ np.arange(3.0), f64)
    assert_close((op @ op.T).as_matrix(), matrix @ matrix.T, f64)
    assert_close(jax.jit(lambda op: (2.0 * op).as_matrix())(op), 2 * matrix, f64)
    assert true_predicates(lx.TaggedLinearOperator(op, sym)) == {"symmetric"}


class _ValueSymmetricOperator(_UserOperator):
    pass


class _ValuePsdOperator(_UserOperator):
    pass


class _ValueDiagonalOperator(_UserOperator):
    pass


class _UnionA(_UserOperator):
    pass


class _UnionB(_UserOperator):
    pass


# `register` of a union of classes, as `functools.singledispatch` allows: the
# check of the registered function must keep it a class argument (a first
# version took it for an annotated function, and raised).
lx.is_symmetric.register(_UnionA | _UnionB)(lambda op: True)


# Predicates that look at the operator's values: fine eagerly, traced under `jit`.
# All three forms of `register`. (They return arrays, not the `bool` the
# predicates are typed with: the mistake under test.)
def _value_symmetric(op) -> Any:
    return jnp.allclose(op.matrix, op.matrix.T)


def _value_psd(op) -> Any:
    return jnp.all(jnp.linalg.eigvalsh(op.matrix) > 0)


lx.is_symmetric.register(_ValueSymmetricOperator)(_value_symmetric)
lx.is_positive_semidefinite.register(_ValuePsdOperator, _value_psd)


@lx.is_diagonal.register
def _(op: _ValueDiagonalOperator) -> Any:
    return jnp.all(jnp.isfinite(op.matrix))  # (not a real test of diagonality)


# Such a predicate failed under `jax.jit` with JAX's `TracerBoolConversionError`
# raised from an `if` inside lineax, naming neither the predicate nor the class.
@pytest.mark.parametrize(
    "cls, name",
    [
        (_ValueSymmetricOperator, "is_symmetric"),
        (_ValuePsdOperator, "is_positive_semidefinite"),
        (_ValueDiagonalOperator, "is_diagonal"),
    ],
)
def test_user_predicate_returning_a_traced_array_is_named(cls, name):
    matrix = jnp.asarray(random_matrix(np.random.default_rng(0), 3, 3, f64, psd))
    vector = jnp.ones(3)
    # Eagerly the value is concrete, and used as it was.
    assert bool(getattr(lx, name)(cls(matrix)))
    message = rf"`lineax\.{name}` registered for {cls.__name__} returned a traced"
    with pytest.raises(TypeError, match=message):
        jax.jit(lambda m: getattr(lx, name)(cls(m)))(matrix)
    if name != "is_symmetric":  # (`AutoLinearSolver` consults the other two)
        with pytest.raises(TypeError, match=message):
            jax.jit(lambda m: lx.linear_solve(cls(m), vector).value)(matrix)


def test_user_predicate_registered_for_a_union_of_classes():
    matrix = jnp.eye(3)
    for cls in (_UnionA, _UnionB):
        assert lx.is_symmetric(cls(matrix))
        assert jax.jit(lambda m, cls=cls: lx.is_symmetric(cls(m)))(matrix)


def test_user_operator_registered():
    matrix = random_matrix(np.random.default_rng(0), 3, 3, f64, psd)
    op = _SymmetricOperator(jnp.asarray(matrix))
    assert true_predicates(op) == {"symmetric", "psd"}
    assert true_predicates(-op) == {"symmetric", "nsd"}
    assert true_predicates(op + op) == {"symmetric", "psd"}
    assert true_predicates(op * jnp.array(2.0)) == {"symmetric"}
    # The registration is for the subclass only.
    assert true_predicates(_UserOperator(jnp.asarray(matrix))) == set()


def test_predicates_reject_non_operators():
    for pred in PREDICATES.values():
        with pytest.raises(TypeError, match="AbstractLinearOperator"):
            pred(jnp.eye(2))


#
# The table of tag meanings, from which the predicates are generated.
#


def _public_tags():
    return {getattr(lx, name) for name in dir(lx) if name.endswith("_tag")}


def test_tag_table_every_tag_has_a_predicate_and_docs():
    from lineax._operator.base import PREDICATE_OF_TAG
    from lineax._tags import TAG_MEANINGS

    assert set(TAG_MEANINGS) == _public_tags()
    assert list(PREDICATE_OF_TAG) == list(TAG_MEANINGS)
    predicates = set()
    for tag, meaning in TAG_MEANINGS.items():
        predicate = getattr(lx, meaning.predicate)
        predicates.add(predicate)
        assert predicate is PREDICATE_OF_TAG[tag]
        assert predicate.__name__ == meaning.predicate
        assert getattr(lx, repr(tag)) is tag
        # The tag's docs, and the predicate's (generated, naming the tag).
        assert tag.__doc__ == meaning.doc and meaning.doc
        doc = predicate.__doc__
        assert doc.startswith(f"Whether an operator {meaning.holds},")
        assert f"[`lineax.{tag!r}`][]" in doc
        assert f"`@lineax.{meaning.predicate}.register(MyOperator)`" in doc
        # The docs site reads the docstring through `__wrapped__`.
        assert predicate.__wrapped__.__doc__ == doc
    assert predicates == set(PREDICATES.values())


def test_tag_table_implications_and_transposition():
    from lineax._tags import TAG_MEANINGS

    name_of = {pred: name for name, pred in PREDICATES.items()}
    for tag, meaning in TAG_MEANINGS.items():
        implied = {tag, *meaning.implies}
        expected = {name_of[getattr(lx, TAG_MEANINGS[t].predicate)] for t in implied}
        for op in (_mat(tag), lx.TaggedLinearOperator(_fun(), tag)):
            assert true_predicates(op) == expected
        # Transposing maps each tag by the table, and back again.
        assert lx.transpose_tags(tag) == frozenset([meaning.transposed])
        assert TAG_MEANINGS[meaning.transposed].transposed is tag
        transposed = {
            name_of[getattr(lx, TAG_MEANINGS[TAG_MEANINGS[t].transposed].predicate)]
            for t in implied
        }
        assert true_predicates(_mat(tag).T) == transposed


#
# Everyday slips with tags and arrays.
#


def test_string_tag_is_refused_naming_the_real_tags():
    eye = jnp.eye(2)
    with pytest.raises(TypeError, match=r"Did you mean `lx\.symmetric_tag`\?"):
        lx.MatrixLinearOperator(eye, "symmetric")
    with pytest.raises(
        TypeError, match=r"Did you mean `lx\.positive_semidefinite_tag`\?"
    ):
        lx.TaggedLinearOperator(_fun(), [psd, "positive_semidefinite_tag"])
    with pytest.raises(TypeError, match=r"lx\.lower_triangular_tag") as info:
        lx.FunctionLinearOperator(lambda x: x, _S, ("lx.lower_triangular",))
    message = str(info.value)
    assert "`tags`" in message and "'lx.lower_triangular'" in message
    for tag in [sym, diag, tri, lower, upper, unit, psd, nsd]:
        assert f"`lx.{tag!r}`" in message
    with pytest.raises(TypeError, match="not strings"):
        lx.transpose_tags("lower_triangular")
    # A tag of one's own that is not a string is still accepted.
    mine = _UserTag("mine")
    assert lx.MatrixLinearOperator(eye, mine).tags == frozenset([mine])


def test_python_list_as_array_says_use_asarray():
    with pytest.raises(
        TypeError, match=r"`matrix`.*Python list.*jnp\.asarray\(matrix\)"
    ):
        lx.MatrixLinearOperator([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(TypeError, match=r"jnp\.asarray\(diagonal\)"):
        lx.DiagonalLinearOperator([1.0, 2.0])
    # (A list is not `ArrayLike`: under the test run's type checking the
    # signature's check comes first; `.ci/run` checks the message without it.)
    with raises_message(TypeError, r"`lower_diagonal`.*jnp\.asarray"):
        lx.TridiagonalLinearOperator(jnp.ones(2), [1.0], jnp.ones(1))  # pyright: ignore[reportArgumentType]
    # A list of arrays is a PyTree diagonal, as before.
    op = lx.DiagonalLinearOperator([jnp.ones(2), jnp.ones(1)])
    assert op.in_size() == 3


#
# Which operators `linear_solve` may run through its cached compiled function.
#


def _negate(x):
    return -x


def test_is_cacheable():
    from lineax._operator.base import is_cacheable

    m = _mat()
    cacheable = [
        m,
        _pyt(),
        lx.DiagonalLinearOperator(jnp.ones(3)),
        lx.TridiagonalLinearOperator(jnp.ones(3), jnp.ones(2), jnp.ones(2)),
        lx.IdentityLinearOperator(_S),
        lx.TaggedLinearOperator(m, psd),
        -m,
        m + m,
        m @ m,
        m * jnp.array(2.0),
        m / jnp.array(-2.0),
        # The sign of a Python number is read at trace time: the cache keys the
        # number by its value (`_linear_solve._without_statics`).
        m * 2.0,
        m / -2.0,
        1j * m,
        # A function closing over arrays is closure-converted: its jaxpr, the one
        # leaf not an array, is compared by identity in the cache's key (see
        # `function.holds_its_jaxpr`).
        _fun(),
        _jac(),
        lx.TaggedLinearOperator(_fun(), psd),
        m + _fun(),
        _fun() @ m,
        -_fun(),
    ]
    for op in cacheable:
        assert is_cacheable(op) is True, op
    not_cacheable = [
        # Its closure would be baked in.
        lx.FunctionLinearOperator(lambda x: m.mv(x), _S, closure_convert=False),
        # No closure: it reads globals (`linear_solve` traces it anew per solve).
        lx.FunctionLinearOperator(_negate, _S),
        m + lx.FunctionLinearOperator(_negate, _S),
        # (`True` is no scale: a `bool` leaf is never keyed.)
        lx.MulLinearOperator(m, True),
        lx.TangentLinearOperator(m, m),
        jnp.eye(3),
        "not an operator",
    ]
    for op in not_cacheable:
        assert is_cacheable(op) is False, op

    @jax.jit
    def traced(matrix):
        assert is_cacheable(lx.MatrixLinearOperator(matrix)) is False
        return matrix

    traced(jnp.eye(2))
