"""Convert the built-in example model and print the summary: `python -m quant_core.demo [DIR]`."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from .cli import main as cli_main
from .example import write_example_model


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="scaled-fp16-demo-"))
    source = write_example_model(folder / "example_model.safetensors")
    print(f"example model written to {source}")
    return cli_main(["--input", str(source), "--overwrite", *argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main())
