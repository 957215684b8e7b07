"""A built-in English corpus that needs no download: the documentation that ships with CPython.

Two parts, in a fixed order: the reference topics behind `help()` (`pydoc_data.topics`, one document
per topic), then the docstrings of the standard library, one document per module. Docstrings are
read by parsing the source files with `ast`, so no module is imported and nothing runs
(`antigravity`, `this`, GUI toolkits). For a given Python version the result is always the same.
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig

# Folders of the standard library that hold tests, demos or third-party packages rather than docs.
SKIP_DIRS = {"test", "tests", "idle_test", "turtledemo", "site-packages", "dist-packages", "__pycache__"}


def builtin_documents() -> list[str]:
    """The built-in corpus (about 2 MB of English for CPython 3.11) as a list of documents."""
    return list(_builtin_documents())


@functools.cache
def _builtin_documents() -> tuple[str, ...]:
    return tuple(text for text in map(_usable, (*pydoc_topics(), *stdlib_docstrings())) if text)


def _usable(text: str) -> str:
    """`text` if it is valid UTF-8-encodable text, else "" (a few docstrings hold lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return ""
    return text.strip()


def pydoc_topics() -> list[str]:
    """The language reference topics shown by `help('TOPIC')`, sorted by topic name."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def stdlib_docstrings() -> list[str]:
    """One document per standard-library module: its module, class and function docstrings, in source order."""
    root = sysconfig.get_paths()["stdlib"]
    documents = []
    for path in _stdlib_sources(root):
        module = os.path.relpath(path, root)[: -len(".py")].replace(os.sep, ".").removesuffix(".__init__")
        document = _module_docs(path, module)
        if document:
            documents.append(document)
    return documents


def _stdlib_sources(root: str) -> list[str]:
    sources = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("config-"))
        sources += [os.path.join(folder, name) for name in sorted(files) if name.endswith(".py")]
    return sources


def _module_docs(path: str, module: str) -> str:
    """`module`'s docstrings as one text, each under a heading naming what it documents."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return ""
    parts = []
    for name, node in _documented(tree, module):
        doc = ast.get_docstring(node)
        if doc:
            parts.append(f"{name}\n\n{doc}")
    return "\n\n".join(parts)


def _documented(node: ast.AST, name: str):
    """(qualified name, node) for a module and the classes and functions inside it, in source order."""
    yield name, node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _documented(child, f"{name}.{child.name}")
