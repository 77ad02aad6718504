"""A benchmark's result: its markdown lines written where the README quotes them from, and printed."""

from __future__ import annotations

from pathlib import Path


def write_results(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")
