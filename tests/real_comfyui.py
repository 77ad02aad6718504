"""Where the real-ComfyUI tests find ComfyUI, and how they skip without it.

They run in ComfyUI's own Python with `COMFYUI_PATH` set to a ComfyUI checkout (`.ci/run` sets up
0.3.64 and 0.30.0 from ../shared/comfyui); elsewhere they skip with one line saying how to run them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
HOW_TO_RUN = (
    "real ComfyUI not configured: run with COMFYUI_PATH=/path/to/ComfyUI and that ComfyUI's Python "
    "(python -m pytest tests), or bash .ci/run"
)


def require_comfyui() -> None:
    """Skip the calling test module (one line in the summary) unless real ComfyUI is configured."""
    if not COMFYUI_PATH:
        pytest.skip(HOW_TO_RUN, allow_module_level=True)


SCRIPT_TIMEOUT = 900


def run_script(script: Path, *args: str) -> dict:
    """Run a test script in this Python with ComfyUI's folder current; returns the JSON of its last line."""
    done = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=COMFYUI_PATH,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
