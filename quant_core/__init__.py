"""Scaled FP16 conversion with learned rounding: the engine shared by the CLI and the ComfyUI nodes.

Never imports ComfyUI, so it runs (and is tested) anywhere torch and safetensors do. Importing the
package is cheap: the converter is loaded on first use of `convert_file`, `ConvertOptions` or
`default_output_path`, so `from quant_core import QuantError` loads only the error type.
"""

from __future__ import annotations

from typing import Any

from .errors import QuantError

__version__ = "0.2.0"
__all__ = ["ConvertOptions", "QuantError", "__version__", "convert_file", "default_output_path"]
_FROM_CONVERT = ("ConvertOptions", "convert_file", "default_output_path")


def __getattr__(name: str) -> Any:
    if name in _FROM_CONVERT:
        from . import convert

        return getattr(convert, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
