# ruff: noqa: E501 (the keys are first lines of the snippets, quoted whole)
"""Every Python snippet of README.md and the docs pages runs as written.

A snippet may use names that its page defines in prose ("`operator`", "`b`"):
`_SETUP` gives them small values, keyed by the page and the snippet's first line.
`_CHECKS` asserts what the text around a few snippets says. All snippets run in
one subprocess (this file, run as a script), each in a fresh namespace holding
the imports the pages assume (`jax`, `jnp`, `jr`, `np`, `eqx`, `lx`), at float32,
as users run them. The examples in `examples/` run in `tests/test_examples.py`.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import traceback


_ROOT = pathlib.Path(__file__).resolve().parent.parent
_PAGES = [_ROOT / "README.md"] + sorted(
    p for p in (_ROOT / "docs").rglob("*.md") if "examples" not in p.parts
)
_SNIPPET = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)

_MATRIX = "A = 4 * jnp.eye(4) + 0.1 * jr.normal(jr.key(0), (4, 4))\n"
_DENSE = _MATRIX + "operator = lx.MatrixLinearOperator(A)\n"
_SPD = (
    _MATRIX
    + "operator = lx.MatrixLinearOperator(A @ A.T, lx.positive_semidefinite_tag)\n"
)

# (page, first line of the snippet) -> code defining the names it takes from the page.
_SETUP = {
    (
        "docs/failures.md",
        "sol = lx.linear_solve(operator, vector, solver, throw=False)",
    ): (_DENSE + "vector = jnp.ones(4); solver = lx.LU()"),
    (
        "docs/api/solution.md",
        "sol = lx.linear_solve(operator, vector, solver, throw=False)",
    ): (_DENSE + "vector = jnp.ones(4); solver = lx.LU()"),
    ("docs/failures.md", "sol = lx.linear_solve(operator, vector, throw=False)"): (
        _DENSE + "vector = jnp.ones(4)"
    ),
    (
        "docs/api/preconditioners.md",
        "operator = lx.MatrixLinearOperator(matrix, lx.positive_semidefinite_tag)",
    ): (_MATRIX + "matrix = A @ A.T; vector = jnp.ones(4)"),
    (
        "docs/faq.md",
        "x = lx.linear_solve(lx.MatrixLinearOperator(tall_matrix), b, lx.QR()).value",
    ): ("tall_matrix = jr.normal(jr.key(1), (6, 3)); b = jnp.ones(6)"),
    ("docs/faq.md", "solve = lambda b: lx.linear_solve(operator, b, lx.LU()).value"): (
        _DENSE + "bs = jnp.ones((3, 4))"
    ),
    ("docs/faq.md", "solver = lx.LU()"): _DENSE + "bs = jnp.ones((2, 4))",
    ("docs/faq.md", 'structure = {"a": jax.ShapeDtypeStruct((), jnp.float32),'): (
        "fn = lambda x: x"
    ),
    ("docs/faq.md", "@lx.is_symmetric.register(MyOperator)"): """
class MyOperator(lx.AbstractLinearOperator):
    m: jax.Array
    def mv(self, v): return self.m @ v
    def as_matrix(self): return self.m
    def transpose(self): return MyOperator(self.m.T)
    def in_structure(self): return jax.ShapeDtypeStruct((2,), self.m.dtype)
    def out_structure(self): return jax.ShapeDtypeStruct((2,), self.m.dtype)
""",
    ("docs/faq.md", "@jax.jit"): _DENSE + "b = jnp.ones(4)",
    (
        "docs/faq.md",
        "solution = eqx.filter_jit(lambda b: lx.linear_solve(operator, b, solver))(b)",
    ): (
        _MATRIX + "operator = lx.FunctionLinearOperator(lambda v: A @ v, "
        "jax.ShapeDtypeStruct((4,), jnp.float32))\n"
        "solver = lx.GMRES(rtol=1e-6, atol=1e-6); b = jnp.ones(4)"
    ),
    (
        "docs/iterative.md",
        "solution = lx.linear_solve(operator, b, lx.CG(rtol=1e-6, atol=0.0), throw=False)",
    ): (
        _SPD + "b = jnp.ones(4)\n"
        "class plt:\n    semilogy = staticmethod(lambda y: None)"
    ),
    ("docs/performance.md", "@jax.jit"): _MATRIX
    + "matrix = A; right_hand_sides = [jnp.ones(4)]",
    (
        "docs/performance.md",
        "# Slow: a new lambda per iteration, so a new operator each time.",
    ): (
        _MATRIX + "params = [1.0, 2.0]; apply = lambda p, v: p * (A @ A.T @ v)\n"
        "structure = jax.ShapeDtypeStruct((4,), jnp.float32); b = jnp.ones(4)"
    ),
    (
        "docs/performance.md",
        "xs = jax.vmap(lambda A, b: lx.linear_solve(lx.MatrixLinearOperator(A), b).value)(As, bs)",
    ): (_DENSE + "As = jnp.stack([A, A + 1]); bs = jnp.ones((2, 4))"),
    ("docs/performance.md", "solver = lx.LU()"): _DENSE + "b1 = jnp.ones(4); b2 = -b1",
    (
        "docs/preconditioners.md",
        "operator = lx.FunctionLinearOperator(stencil, struct, lx.positive_semidefinite_tag)",
    ): """
def laplacian(u, h):
    padded = jnp.pad(u, 1)
    return (4 * u - padded[:-2, 1:-1] - padded[2:, 1:-1]
            - padded[1:-1, :-2] - padded[1:-1, 2:]) / h**2
grid_shape = (16, 16); h = 1 / 17
stencil = lambda u: laplacian(u, h)
struct = jax.ShapeDtypeStruct(grid_shape, jnp.float32)
b = jr.normal(jr.key(3), grid_shape)
""",
    ("docs/sharding.md", "import jax, numpy as np"): "b = jnp.arange(8.0)",
    ("docs/sharding.md", "from jax.sharding import PartitionSpec as P"): (
        _MATRIX + "b = jnp.ones(4)"
    ),
    ("docs/structured.md", "import jax.numpy as jnp"): (
        _MATRIX + "a_matrix = A; b_matrix = A[:3, :3]; vector = jnp.ones(12)"
    ),
    (
        "docs/structured.md",
        "op = lx.LowRankUpdateLinearOperator(lx.DiagonalLinearOperator(d), u, c, v)",
    ): (
        "d = jnp.arange(1.0, 7.0); u = jr.normal(jr.key(5), (6, 2)); c = jnp.eye(2)\n"
        "v = u.T; vector = jnp.ones(6)"
    ),
    ("docs/structured.md", "op = lx.BlockDiagonalLinearOperator([op1, op2, op3])"): _SPD
    + """
op1 = op2 = operator; op3 = lx.DiagonalLinearOperator(jnp.arange(1.0, 4.0))
b1 = b2 = jnp.ones(4); b3 = jnp.ones(3)
a = operator; bt = lx.MatrixLinearOperator(jr.normal(jr.key(6), (4, 2))); b = bt.T
f = jnp.ones(4); g = jnp.ones(2)
""",
    ("docs/structured.md", "import scipy.sparse"): "n = 20; b = jnp.ones(20)",
}

# Snippets that cannot run here: (page, first line) -> why. They are compiled only.
_SKIP = {
    ("docs/sharding.md", "def local(x):                       # this device's rows"): (
        "a fragment (its stencil is `...`)"
    ),
    (
        "docs/sharding.md",
        "import jax",
    ): "needs many hosts (`jax.distributed.initialize`)",
}

# What the text around a snippet says it does.
_CHECKS = {
    ("docs/api/linear_solve.md", "import jax.numpy as jnp"): (
        "assert jnp.allclose(solution.value, jnp.array([0.4, -0.2]))"
    ),
    ("docs/api/tags.md", "import jax.numpy as jnp"): "assert isinstance("
    "lx.AutoLinearSolver(well_posed=True).select_solver(op), lx.Cholesky)",
    (
        "docs/api/solution.md",
        "sol = lx.linear_solve(operator, vector, solver, throw=False)",
    ): ('assert bool(ok) and message == ""'),
    ("docs/faq.md", "@lx.is_symmetric.register(MyOperator)"): (
        "assert lx.is_symmetric(MyOperator(jnp.eye(2)))"
    ),
    ("docs/structured.md", "import jax.numpy as jnp"): "assert jnp.allclose("
    "x, jnp.linalg.solve(jnp.kron(a_matrix, b_matrix), vector), rtol=1e-4)",
    (
        "docs/structured.md",
        "op = lx.LowRankUpdateLinearOperator(lx.DiagonalLinearOperator(d), u, c, v)",
    ): (
        "assert jnp.allclose(x, jnp.linalg.solve(jnp.diag(d) + u @ c @ v, vector), "
        "rtol=1e-4)"
    ),
    ("docs/structured.md", "import scipy.sparse"): (
        "i = jnp.arange(1, n + 1); assert jnp.allclose(x, i * (n + 1 - i) / 2, rtol=1e-5)"
    ),
    ("docs/sharding.md", "from jax.sharding import PartitionSpec as P"): (
        "assert np.allclose(x, np.linalg.solve(np.asarray(A), np.asarray(b)), rtol=1e-4)"
    ),
}


def _snippets():
    for page in _PAGES:
        name = page.relative_to(_ROOT).as_posix()
        for code in _SNIPPET.findall(page.read_text(encoding="utf-8")):
            yield name, code.splitlines()[0], code


def _run_all() -> None:
    """Run every snippet; print a JSON report {page: first line: error or null}."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np

    import lineax as lx

    report = {}
    for page, first, code in _snippets():
        key = (page, first)
        if f"{page}: {first}" in report:
            raise ValueError(f"two snippets of {page} start with {first!r}")
        namespace = dict(jax=jax, jnp=jnp, jr=jr, np=np, eqx=eqx, lx=lx)
        try:
            compiled = compile(code, f"{page}: {first}", "exec")
            if key not in _SKIP:
                exec(_SETUP.get(key, ""), namespace)
                exec(compiled, namespace)
                exec(_CHECKS.get(key, ""), namespace)
            error = None
        except BaseException:
            error = traceback.format_exc(limit=-3)
        report[f"{page}: {first}"] = error
    print(json.dumps(report))


def test_every_docs_snippet_runs(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="default")
    import lineax

    env["PYTHONPATH"] = os.pathsep.join(
        [str(pathlib.Path(lineax.__file__).resolve().parent.parent)]
        + list(filter(None, [env.get("PYTHONPATH")]))
    )
    env.pop("JAX_ENABLE_X64", None)
    completed = subprocess.run(
        [sys.executable, __file__],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert len(report) >= 25, sorted(report)
    failed = {key: error for key, error in report.items() if error is not None}
    assert not failed, "\n\n".join(f"--- {k}\n{e}" for k, e in failed.items())
    stale = [
        f"{page}: {first}"
        for page, first in [*_SETUP, *_SKIP, *_CHECKS]
        if f"{page}: {first}" not in report
    ]
    assert not stale, f"setups for snippets that no longer exist: {stale}"


if __name__ == "__main__":
    _run_all()
