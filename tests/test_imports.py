"""How the engine's modules depend on each other: cheap to import where only a little is needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_error_type_loads_neither_the_converter_nor_torch() -> None:
    code = (
        "import sys\n"
        "from quant_core import QuantError\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('quant_core') or m == 'torch')\n"
        "assert loaded == ['quant_core', 'quant_core.errors'], loaded\n"
        "from quant_core import convert_file\n"
        "assert 'quant_core.convert' in sys.modules and callable(convert_file)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
