"""Render `examples/*.py` as docs pages, with their output, plot and run time.

    PYTHONPATH=src python docs/_ext/render_examples.py [NAME ...]

Runs each example (all of them, or the named ones) in a subprocess, and writes
`docs/examples/NAME.md`: the module docstring as the introduction, the
measured run time, the source, what it printed and, for an example that takes
an output path as its first argument and writes a PNG there, the picture
(`docs/examples/NAME.png`). It also writes `docs/examples/index.md`, the list.

The pages are committed: the docs build does not run the examples (that would
make `mkdocs build` take minutes and need matplotlib). Rerun this script after
changing an example; `tests/test_docs_names.py` checks that every example has
a page.
"""

import ast
import os
import pathlib
import subprocess
import sys
import time


ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
OUT = ROOT / "docs" / "examples"


def _docstring(source: str) -> str:
    return ast.get_docstring(ast.parse(source)) or ""


def _title_and_body(doc: str, name: str) -> tuple[str, str]:
    # The first paragraph is the title (it may wrap over two lines).
    first, _, rest = doc.strip().partition("\n\n")
    if not first:
        return name, ""
    return " ".join(first.split()).rstrip("."), rest.strip()


def render(script: pathlib.Path) -> str:
    source = script.read_text()
    name = script.stem
    png = OUT / f"{name}.png"
    png.unlink(missing_ok=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    start = time.perf_counter()
    completed = subprocess.run(
        # Relative to `cwd`, so that the page does not print this machine's path.
        [sys.executable, str(script), png.name],
        cwd=OUT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"{script.name} failed:\n{completed.stderr}")
    title, body = _title_and_body(_docstring(source), name)
    parts = [
        f"# {title}",
        "",
        body,
        "",
        f"Run it with `python examples/{script.name}`. When this page was made it "
        f"took {seconds:.0f} s, compilation included, on a shared 2-core CPU.",
        "",
        "```python",
        source.rstrip(),
        "```",
        "",
        "Output:",
        "",
        "```text",
        completed.stdout.rstrip(),
        "```",
    ]
    if png.exists():
        parts += ["", f"![{title}]({name}.png)"]
    (OUT / f"{name}.md").write_text("\n".join(parts) + "\n")
    print(f"{name}: {seconds:.1f} s")
    return title


def main(names: list[str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    scripts = sorted(EXAMPLES.glob("*.py"))
    for script in scripts:
        if not names or script.stem in names:
            render(script)
    index = ["# Examples", "", "Each is a plain script in `examples/`.", ""]
    for script in scripts:
        title, _ = _title_and_body(_docstring(script.read_text()), script.stem)
        index.append(f"- [{title}]({script.stem}.md) (`examples/{script.name}`)")
    (OUT / "index.md").write_text("\n".join(index) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
