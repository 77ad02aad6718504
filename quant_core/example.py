"""A small generated model with the traits that matter for scaled float16 conversion.

Used by the demo and the tests, so nothing has to be downloaded: fp32 and bf16 Linear weights,
LayerNorm parameters, biases, an embedding, an integer buffer, and one weight with values far
beyond float16's range (which the original script turned into NaN).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .safetensors_io import write_state_dict


def example_state_dict(hidden: int = 256, layers: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    sd: dict[str, torch.Tensor] = {
        "embed.weight": randn(1000, hidden),
        "embed.position_ids": torch.arange(128, dtype=torch.int64).unsqueeze(0),
    }
    for i in range(layers):
        p = f"blocks.{i}."
        sd[p + "norm.weight"] = 1 + randn(hidden, std=0.1)
        sd[p + "norm.bias"] = randn(hidden)
        sd[p + "attn.qkv.weight"] = randn(3 * hidden, hidden)
        sd[p + "attn.qkv.bias"] = randn(3 * hidden)
        sd[p + "attn.out.weight"] = randn(hidden, hidden).to(torch.bfloat16)
        sd[p + "mlp.up.weight"] = randn(4 * hidden, hidden)
        sd[p + "mlp.up.bias"] = randn(4 * hidden)
        sd[p + "mlp.down.weight"] = randn(hidden, 4 * hidden)
    outlier = randn(hidden, hidden)
    outlier[0, :8] = torch.tensor([1e5, -2e5, 7e4, 65505.0, 1e-3, -1e-3, 3e5, 1.0])
    sd["head.weight"] = outlier
    return sd


def write_example_model(path: str | Path, **kwargs: int) -> Path:
    return write_state_dict(example_state_dict(**kwargs), path, metadata={"format": "pt", "name": "example"})
