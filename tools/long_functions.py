"""List the longest functions and modules of the package: what docs/architecture.md reports as still long.

    python tools/long_functions.py [--over 50] [--json out.json]

A function's length counts its lines after the docstring (the code a reader has to follow); a module's, all lines.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "rankclip_ds"


def function_lengths(root: Path = ROOT) -> list[tuple[int, str]]:
    """``(lines after the docstring, "path:line name")`` of every function under ``root``, longest first."""
    rows = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            first = body[0]
            has_doc = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant)
            start = (body[1].lineno if len(body) > 1 else first.end_lineno) if has_doc else first.lineno
            rows.append((node.end_lineno - start + 1, f"{path.relative_to(root.parent)}:{node.lineno} {node.name}"))
    return sorted(rows, reverse=True)


def module_lengths(root: Path = ROOT) -> list[tuple[int, str]]:
    return sorted(((len(p.read_text().splitlines()), str(p.relative_to(root.parent))) for p in root.rglob("*.py")),
                  reverse=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--over", type=int, default=50, help="list functions longer than this (default 50)")
    parser.add_argument("--modules-over", type=int, default=350, help="list modules longer than this")
    parser.add_argument("--json", help="also write the lists to this file")
    args = parser.parse_args(argv)
    functions = [r for r in function_lengths() if r[0] > args.over]
    modules = [r for r in module_lengths() if r[0] > args.modules_over]
    print(f"functions over {args.over} lines (after the docstring):")
    for n, name in functions:
        print(f"  {n:4d}  {name}")
    print(f"modules over {args.modules_over} lines:")
    for n, name in modules:
        print(f"  {n:4d}  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps({"functions": functions, "modules": modules}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
