"""Scaled FP16 conversion with learned rounding: the engine shared by the CLI and the ComfyUI nodes.

Never imports ComfyUI, so it runs (and is tested) anywhere torch and safetensors do.
"""

__version__ = "0.1.0"

from .convert import ConvertOptions, convert_file, default_output_path  # noqa: E402
from .errors import QuantError  # noqa: E402

__all__ = ["ConvertOptions", "QuantError", "__version__", "convert_file", "default_output_path"]
