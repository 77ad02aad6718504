"""Compatibility entry point: batch scripts written for the original converter keep working.

python convert_fp16_scaled_learned_svd_fast.py --input model.safetensors
"""

from quant_core.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
