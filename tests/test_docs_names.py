"""Every public name of lineax is documented with a `::: lineax.NAME` directive."""

import html
import inspect
import os
import pathlib
import re
import subprocess
import sys

import pytest

import lineax as lx
import lineax.internal as lxi


_DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"

# The public API contract (shared/API-names.txt).
_PUBLIC = """
AbstractLinearOperator AbstractLinearSolver AddLinearOperator AutoLinearSolver
BiCGStab CG Cholesky ComposedLinearOperator Diagonal DiagonalLinearOperator
DivLinearOperator FunctionLinearOperator GMRES IdentityLinearOperator
JacobianLinearOperator LSMR LU MatrixLinearOperator MulLinearOperator
NegLinearOperator Normal NormalCG PyTreeLinearOperator QR RESULTS SVD Solution
TaggedLinearOperator TangentLinearOperator Triangular Tridiagonal
TridiagonalLinearOperator conj diagonal diagonal_tag has_unit_diagonal invert
is_diagonal is_lower_triangular is_negative_semidefinite
is_positive_semidefinite is_symmetric is_tridiagonal is_upper_triangular
linear_solve linearise lower_triangular_tag materialise
negative_semidefinite_tag positive_semidefinite_tag symmetric_tag
transpose_tags transpose_tags_rules tridiagonal tridiagonal_tag
unit_diagonal_tag upper_triangular_tag
MINRES
""".split()
_INTERNAL = """
PackedStructures complex_to_real_dtype default_floating_dtype linear_solve_p
max_norm pack_structures ravel_vector rms_norm sum_squares
transpose_packed_structures tree_dot two_norm
""".split()


def _defined_in_lineax(module):
    """Public classes and functions of `module` whose home is lineax."""
    names = set()
    for name in dir(module):
        if name.startswith("_"):
            continue
        obj = getattr(module, name)
        if (inspect.isclass(obj) or callable(obj)) and getattr(
            obj, "__module__", ""
        ).startswith("lineax"):
            names.add(name)
    return names


def _documented():
    pattern = re.compile(r"^:::\s+(lineax(?:\.internal)?)\.(\w+)\s*$", re.MULTILINE)
    found = {"lineax": set(), "lineax.internal": set()}
    for page in _DOCS.rglob("*.md"):
        for module, name in pattern.findall(page.read_text(encoding="utf-8")):
            found[module].add(name)
    return found


def test_docs_directory_exists():
    assert (_DOCS / "index.md").is_file()
    assert (_DOCS.parent / "mkdocs.yml").is_file()


@pytest.mark.parametrize(
    "module, expected",
    [
        (lx, set(_PUBLIC) | _defined_in_lineax(lx)),
        (lxi, set(_INTERNAL) | _defined_in_lineax(lxi)),
    ],
    ids=["lineax", "lineax.internal"],
)
def test_every_public_name_is_documented(module, expected):
    expected = {name for name in expected if hasattr(module, name)}
    documented = _documented()[module.__name__]
    missing = sorted(expected - documented)
    assert not missing, (
        f"public names of {module.__name__} with no `::: {module.__name__}.NAME` "
        f"in docs/: {missing}"
    )


def test_contract_names_exist():
    # A documented-but-absent name would break `mkdocs build --strict`.
    missing = [n for n in _PUBLIC if n != "MINRES" and not hasattr(lx, n)]
    missing += [f"internal.{n}" for n in _INTERNAL if not hasattr(lxi, n)]
    assert not missing, missing


def test_no_stray_module_in_the_public_namespace():
    # `import importlib.metadata` in `__init__.py` made `lx.importlib` public.
    # (In a fresh process: the tests' type-checking import hook adds `jaxtyping`.)
    code = (
        "import types, lineax as lx; print(sorted(n for n in dir(lx) if not "
        "n.startswith('_') and isinstance(getattr(lx, n), types.ModuleType)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "['internal']"


def test_documented_names_exist():
    documented = _documented()
    stale = [f"lineax.{n}" for n in documented["lineax"] if not hasattr(lx, n)]
    stale += [
        f"lineax.internal.{n}"
        for n in documented["lineax.internal"]
        if not hasattr(lxi, n)
    ]
    assert not stale, f"docs reference names that lineax does not have: {stale}"


def test_mkdocs_build_strict(tmp_path):
    """The documentation site builds with no warnings (needs the `docs` extra)."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    completed = subprocess.run(
        # Not `-q`: it hides the warnings that `--strict` turns into a failure.
        [sys.executable, "-m", "mkdocs", "build", "--strict"]
        + ["--site-dir", str(tmp_path / "site")],
        cwd=_DOCS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    # Docstrings generated at import time (from the table of tag meanings) are
    # shown: they once were stray strings that documented nothing.
    api = tmp_path / "site" / "api"
    functions = (api / "functions" / "index.html").read_text(encoding="utf-8")
    tags = (api / "tags" / "index.html").read_text(encoding="utf-8")
    for name in ("is_symmetric", "is_diagonal", "has_unit_diagonal"):
        doc = getattr(lx, name).__doc__
        assert doc.split(",")[0] in functions, name
    for name in ("symmetric_tag", "unit_diagonal_tag"):
        doc = getattr(lx, name).__doc__
        assert doc.split("(")[0] in html.unescape(tags), name


def test_every_example_has_a_page_with_its_source():
    """`docs/examples/NAME.md` exists for every `examples/NAME.py`, shows its current
    source, and is in the site's navigation. Regenerate the pages with
    `PYTHONPATH=src python docs/_ext/render_examples.py [NAME ...]`."""
    root = _DOCS.parent
    nav = (root / "mkdocs.yml").read_text()
    stale = []
    for script in sorted((root / "examples").glob("*.py")):
        page = _DOCS / "examples" / f"{script.stem}.md"
        if not page.exists() or script.read_text().rstrip() not in page.read_text():
            stale.append(script.stem)
        assert f"examples/{script.stem}.md" in nav, script.stem
    assert not stale, f"rerun docs/_ext/render_examples.py for: {stale}"
