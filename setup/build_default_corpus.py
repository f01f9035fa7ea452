#!/usr/bin/env python
"""Build the default training corpus from what every machine has: the installed Python standard library.

    python setup/build_default_corpus.py    # -> data/default/stdlib/stdlib.chunk.00.jsonl ... + stdlib.val.jsonl

No network. Documents (about 3-4 MB of English text in all, from ~700 modules):
  - per module: its docstring; per top-level class: the class and method docstrings with signatures; per
    top-level function: its signature and docstring (extracted with `ast`, nothing is imported);
  - per module: its comment blocks (consecutive full-line `#` comments);
  - the Python reference topics shipped in `pydoc_data.topics` (the text of `help('topic')`).
The stdlib's own test suites and site-packages are left out. Files are read in sorted order and the shuffle
is seeded, so a given Python installation always yields the same corpus. Takes a few seconds.
"""

import argparse
import ast
import os
import sys
import sysconfig
from typing import Iterator, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import prepare_data  # noqa: E402  (setup/prepare_data.py)

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "ensurepip"}
MIN_CHARS = 24  # shorter documents are dropped


def stdlib_files(stdlib: str, max_files: Optional[int] = None) -> List[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith((".", "config-")))
        for name in sorted(filenames):
            if name.endswith(".py"):
                files.append(os.path.join(dirpath, name))
    return files[:max_files] if max_files else files


def _signature(node) -> str:
    try:
        return f"{node.name}({ast.unparse(node.args)})"
    except Exception:
        return f"{node.name}(...)"


def _function_text(node, prefix: str) -> Optional[str]:
    doc = ast.get_docstring(node)
    if not doc:
        return None
    kind = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    body = "\n".join("    " + line if line else "" for line in doc.splitlines())
    return f"{kind} {prefix}{_signature(node)}\n{body}"


def _class_text(node, prefix: str) -> Optional[str]:
    parts = []
    bases = ", ".join(ast.unparse(b) for b in node.bases) if node.bases else ""
    head = f"class {prefix}{node.name}({bases})" if bases else f"class {prefix}{node.name}"
    doc = ast.get_docstring(node)
    parts.append(head + ("\n" + "\n".join("    " + l if l else "" for l in doc.splitlines()) if doc else ""))
    for child in node.body:
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            text = _function_text(child, f"{node.name}.")
            if text:
                parts.append(text)
    return "\n\n".join(parts) if (doc or len(parts) > 1) else None


def _comment_blocks(source: str) -> List[str]:
    blocks, current = [], []
    for line in source.splitlines():
        s = line.strip()
        if s.startswith("#") and not s.startswith("#!"):
            text = s.lstrip("#").strip()
            if text and not set(text) <= set("-=*#~_ "):
                current.append(text)
                continue
        if current:
            blocks.append(" ".join(current))
            current = []
    if current:
        blocks.append(" ".join(current))
    return [b for b in blocks if len(b) >= 40]


def module_documents(path: str, module: str) -> Iterator[str]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        tree = ast.parse(raw, filename=path)
        source = raw.decode("utf-8")
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return
    doc = ast.get_docstring(tree)
    if doc:
        yield f"Module {module}\n\n{doc}"
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            text = _function_text(node, f"{module}.")
        elif isinstance(node, ast.ClassDef):
            text = _class_text(node, f"{module}.")
        else:
            continue
        if text:
            yield text
    comments = _comment_blocks(source)
    if comments:
        yield f"Comments in {module}\n\n" + "\n\n".join(comments)


def pydoc_topics() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    for name in sorted(topics):
        yield topics[name]


def iter_corpus(stdlib: str, max_files: Optional[int] = None) -> Iterator[str]:
    for path in stdlib_files(stdlib, max_files):
        rel = os.path.relpath(path, stdlib)[:-3]
        module = rel.replace(os.sep, ".")
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")]
        for text in module_documents(path, module):
            if len(text) >= MIN_CHARS:
                yield text
    if not max_files:
        for text in pydoc_topics():
            if len(text) >= MIN_CHARS:
                yield text


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "data", "default"),
                   help="output root (default: <repo>/data/default)")
    p.add_argument("--source", default="stdlib", help="source name (default stdlib)")
    p.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="standard library folder to read")
    p.add_argument("--n-chunks", type=int, default=8, help="chunk files (default 8)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="held-out fraction (default 0.02)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument("--max-files", type=int, default=None, help="read only the first N modules (fast tests)")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild if it exists (otherwise an existing corpus is kept)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    a = p.parse_args(argv)
    final = os.path.join(a.out, a.source)
    if os.path.isdir(final) and not a.overwrite:
        print(f"default corpus already at {final} (use --overwrite to rebuild)", file=sys.stderr)
        return {"out_dir": a.out, "source": a.source, "existing": True}
    summary = prepare_data.prepare_documents(
        iter_corpus(a.stdlib, a.max_files), a.out, a.source, n_chunks=a.n_chunks, val_fraction=a.val_fraction,
        seed=a.seed, memory_bytes=256 << 20, estimated_bytes=8 << 20, overwrite=a.overwrite, progress=not a.quiet,
        extra_summary={"inputs": [f"python {sys.version.split()[0]} stdlib docstrings and comments: {a.stdlib}"]},
    )
    if not a.quiet:
        print(prepare_data.format_summary(summary), file=sys.stderr)
    return summary


if __name__ == "__main__":
    try:
        main()
    except prepare_data.PrepareError as e:
        print(f"build_default_corpus: error: {e}", file=sys.stderr)
        sys.exit(1)
