"""Exit codes: README's table, errors.py and the package's error classes say the same."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from cliper_prod import errors
from cliper_prod.errors import EXIT_CODES, CliperError

REPO = Path(__file__).resolve().parents[1]


def readme_exit_codes() -> dict[int, str]:
    """The rows of README's "| exit code | meaning |" table."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| exit code | meaning |"):].split("\n\n")[0]
    return {int(m[1]): m[2] for m in re.finditer(r"^\| (\d+) \| (.+?) \|$", table, re.M)}


def test_readme_table_lists_every_exit_code_with_its_meaning() -> None:
    readme = readme_exit_codes()
    assert sorted(readme) == sorted(EXIT_CODES)
    for code, meaning in EXIT_CODES.items():
        assert readme[code].lower().startswith(meaning.lower()), (code, readme[code])


def test_every_error_class_lives_in_errors_py_with_a_listed_code() -> None:
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, CliperError)]
    assert all(c.exit_code in EXIT_CODES for c in classes)
    defined_elsewhere = []
    for path in (REPO / "cliper_prod").rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(base, "id", getattr(base, "attr", "")) in
                    {c.__name__ for c in classes} for base in node.bases):
                defined_elsewhere.append(f"{path.relative_to(REPO)}:{node.name}")
    assert defined_elsewhere == []
