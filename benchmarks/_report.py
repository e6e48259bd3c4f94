"""Shared ending of the benchmark scripts: print the table, keep JSON and Markdown."""

from __future__ import annotations

from pathlib import Path

from cliper_prod.io import write_json, write_text


def report(out: Path, result: dict, table: str) -> None:
    """Print ``table`` and write ``out``.json (all figures) and ``out``.md (the table)."""
    print(table)
    write_json(out.with_suffix(".json"), result)
    write_text(out.with_suffix(".md"), table + "\n")
