"""The slow tier's list (`tests/slow_tests.txt`, run with `--full`) names tests
that exist: an entry left behind by a renamed test would move nothing, and its
replacement would run by default unnoticed; a typo would do the same."""

import ast
import pathlib

from conftest import read_slow_tests


def _test_functions(path: pathlib.Path) -> set[str]:
    """`function` and `Class::function` of the test functions defined in `path`."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.update(
                f"{node.name}::{child.name}"
                for child in node.body
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            )
    return {name for name in names if name.split("::")[-1].startswith("test")}


def test_slow_tier_names_existing_tests():
    tests = pathlib.Path(__file__).parent
    entries = read_slow_tests()
    assert entries, "tests/slow_tests.txt is empty"
    missing = []
    for entry in sorted(entries):
        file, _, function = entry.partition("::")
        path = tests / file
        if not path.exists() or function not in _test_functions(path):
            missing.append(entry)
    assert not missing, f"tests/slow_tests.txt names no such tests: {missing}"
