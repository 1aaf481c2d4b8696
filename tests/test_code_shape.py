"""Checks of the source tree itself, read as text (nothing compiled): no dead private
definitions, no operator-class switch in the solve's entry point, the oldest-versions
CI job's pins equal to `pyproject.toml`'s lower bounds, and the tests' runtime type
checking of the library actually on."""

import ast
import pathlib
import re
import tomllib

import jax.numpy as jnp
import jaxtyping
import pytest

import lineax as lx


ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "lineax"


def _sources() -> dict[pathlib.Path, str]:
    return {path: path.read_text() for path in sorted(SRC.rglob("*.py"))}


def _private_definitions(tree: ast.Module):
    """The module-level private functions and classes that no decorator registers
    (a `@rule.defjvp`'s function is used through its decorator)."""
    for node in tree.body:
        if (
            isinstance(node, (ast.FunctionDef, ast.ClassDef))
            and node.name.startswith("_")
            and not node.name.startswith("__")
            and not node.decorator_list
        ):
            yield node


def test_no_unused_private_definitions():
    # Issue 15: unused helpers lingered in `_misc.py`, `_packing.py` and
    # `_operator/pytree.py` after the code that called them changed.
    sources = _sources()
    unused = []
    for path, text in sources.items():
        for node in _private_definitions(ast.parse(text)):
            word = re.compile(rf"\b{re.escape(node.name)}\b")
            uses = sum(len(word.findall(other)) for other in sources.values())
            if uses <= 1:  # its own definition
                unused.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not unused, f"private definitions used nowhere: {unused}"


def test_linear_solve_switches_on_no_operator_class():
    # Issue 15, "no type switches outside the operator files": what an operator
    # class changes about a solve is a property it declares in its own file (a
    # dispatching predicate of `_operator/base.py`), so that a new operator
    # touches one file. `AbstractLinearOperator` (the argument check) is allowed.
    operator_classes = {
        name
        for name in dir(lx)
        if name.endswith("LinearOperator") and name != "AbstractLinearOperator"
    }
    tree = ast.parse((SRC / "_linear_solve.py").read_text())
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("isinstance", "issubclass")
            and len(node.args) == 2
        ):
            names = {
                n.id if isinstance(n, ast.Name) else n.attr
                for n in ast.walk(node.args[1])
                if isinstance(n, (ast.Name, ast.Attribute))
            }
            if names & operator_classes:
                found.append(f"line {node.lineno}: {sorted(names & operator_classes)}")
    assert not found, f"`_linear_solve.py` switches on operator classes: {found}"


def test_oldest_constraints_are_the_lower_bounds():
    # The "oldest" CI job (`LINEAX_OLDEST=1 bash .ci/run`) installs
    # `.ci/oldest-constraints.txt`; it tests the oldest supported versions only
    # while those pins equal the lower bounds that `pyproject.toml` declares.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = {}
    for requirement in project["dependencies"]:
        match = re.match(r"^([A-Za-z0-9_.-]+)\s*(?:\[.*\])?\s*(.*)$", requirement)
        assert match, requirement
        name, spec = match.groups()
        lower = re.search(r">=\s*([^,\s]+)", spec)
        assert lower, f"{requirement!r} has no lower bound for the oldest job to pin"
        bounds[name.lower().replace("_", "-")] = lower.group(1)
    pins = {}
    for line in (ROOT / ".ci" / "oldest-constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    assert pins == bounds


def test_the_library_is_type_checked_at_run_time(pytestconfig):
    # conftest.py and the README say that the tests check the library's
    # annotations at run time (jaxtyping's pytest plugin, with beartype); issue 15
    # found that nothing enabled it. A wrongly typed argument must then fail the
    # type check of the public function's signature, before lineax's own test.
    if not pytestconfig.getoption("jaxtyping_packages", None):
        pytest.skip("run without --jaxtyping-packages (`addopts` replaced)")
    with pytest.raises(jaxtyping.TypeCheckError, match="operator"):
        lx.linear_solve([[2.0]], jnp.ones(1))  # pyright: ignore[reportArgumentType]
