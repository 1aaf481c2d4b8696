"""A Griffe extension: documentation generated at import time.

lineax generates some objects from tables (the structure predicates and their
docstrings, and the tags' docstrings, from the table of tag meanings in
`lineax._tags`), so reading the source, as Griffe does, finds an assignment with
no docstring. For such module attributes this imports the module and documents
what it holds: a function (with its signature) for a function, else the
attribute with its object's own `__doc__`.
"""

import importlib
import inspect
import pathlib
import sys
from typing import Any

import griffe


# Import the lineax whose source Griffe reads (`paths: [src]` in mkdocs.yml), not
# whichever one is installed.
_SRC = pathlib.Path(__file__).resolve().parents[2] / "src"
if str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))


class RuntimeDocs(griffe.Extension):
    def on_module_members(self, *, mod: griffe.Module, **kwargs: Any) -> None:
        if not mod.path.startswith("lineax"):
            return
        undocumented = [
            name
            for name, member in mod.members.items()
            if not member.is_alias and member.is_attribute and member.docstring is None
        ]
        if not undocumented:
            return
        runtime = importlib.import_module(mod.path)
        inspected = None
        for name in undocumented:
            obj = getattr(runtime, name, None)
            static = mod[name]
            if inspect.isfunction(obj) and obj.__doc__:
                if inspected is None:
                    inspected = griffe.inspect(mod.path)
                function = inspected[name]
                function.lineno, function.endlineno = static.lineno, static.endlineno
                mod.set_member(name, function)
            elif isinstance(getattr(obj, "__dict__", {}).get("__doc__"), str):
                # (A wrapper such as `jax.custom_batching.custom_vmap` may hold
                # `__doc__ = None` of its own.)
                doc = inspect.cleandoc(obj.__dict__["__doc__"])
                static.docstring = griffe.Docstring(doc, parent=static)
