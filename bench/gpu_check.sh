#!/usr/bin/env bash
# The GPU check, one script for one CUDA GPU (H100-class: well under 8 minutes), offline:
#   1. CUDA conversion against CPU conversion (rtn bit-identical; learned and calibrated within tolerance)
#      and the speed of both on a generated Flux-shaped double-block stream (bench/gpu_check.py);
#   2. the weight-patch paths of tests/test_comfyui_patch_paths.py on CUDA, with ComfyUI 0.30's real
#      Dynamic VRAM (comfy_aimdo on the GPU) instead of the CPU emulation.
#
#   bash bench/gpu_check.sh --prepare   # on a machine with a package index, beside ../shared/comfyui:
#                                       # puts what the GPU machine lacks into .gpu_bundle/ (about 51 MB)
#   bash bench/gpu_check.sh             # on the GPU machine, from the repository root, with .gpu_bundle/ there
#
# Needs there: python3 with torch (CUDA), safetensors, tqdm, numpy, pytest and ComfyUI's other essential
# requirements (transformers, einops, scipy, psutil, pillow, pyyaml); the bundle brings ComfyUI 0.30.0's
# source and the comfy-aimdo / comfy-kitchen wheels. Results go to $OUT (or bench/results/gpu_check/).
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=.gpu_bundle
comfyui_version=0.30.0

if [[ ${1:-} == --prepare ]]; then
  mkdir -p "$bundle/wheels"
  cp "../shared/comfyui/ComfyUI-$comfyui_version.tar.gz" "$bundle/"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$bundle/wheels" comfy-aimdo==0.4.13 comfy-kitchen==0.2.27
  du -sh "$bundle"
  exit 0
fi

python=${PYTHON:-python3}
out=${OUT:-bench/results/gpu_check}
mkdir -p "$out"
"$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: this check needs one")'
[[ -d $bundle ]] || { echo "no $bundle: run 'bash bench/gpu_check.sh --prepare' where a package index is reachable" >&2; exit 2; }
work=$(mktemp -d)
"$python" -m pip install --quiet --no-index --no-deps --target "$work/site" "$bundle"/wheels/*.whl
tar -C "$work" -xzf "$bundle/ComfyUI-$comfyui_version.tar.gz"
mkdir -p "$work/ComfyUI-$comfyui_version/custom_nodes"
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true

status=0
timeout 300 "$python" bench/gpu_check.py --device cuda --out "$out/conversion.md" 2>&1 | tee "$out/conversion.log" || status=1
COMFYUI_PATH="$work/ComfyUI-$comfyui_version" COMFYUI_TEST_DEVICE=cuda timeout 240 \
  "$python" -m pytest -q -s -p no:cacheprovider tests/test_comfyui_patch_paths.py 2>&1 | tee "$out/patch_paths.log" || status=1
echo "gpu check: $([[ $status == 0 ]] && echo passed || echo FAILED); results in $out"
exit $status
