"""Small generated models that real ComfyUI detects: an SD1.x UNet, a CLIP-L text encoder, a LoRA.

ComfyUI detects an SD1.x UNet from its weights: only the channel count (320) and the cross-attention
width (768) are pinned, depth and levels are read from the keys. Two levels with one res block each
(attention on the second) is about 37M parameters and samples an 8x8 latent in ~0.05 s per step on
two CPU cores. CLIP-L's configuration is fixed by ComfyUI, so the text encoder is full size (124M
parameters) with random weights. Everything is seeded, so runs are reproducible.

    python tests/tiny_models.py MODELS_DIR   # writes the integration test's files under MODELS_DIR/<folder>/
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_CHANNELS = 320
CONTEXT_DIM = 768
TIME_DIM = 4 * UNET_CHANNELS
LATENT_CHANNELS = 4
# (channel multiplier, has attention) per level, one res block each.
TINY_LEVELS = ((1, False), (1, True))


def _unet_shapes(levels: tuple[tuple[int, bool], ...] = TINY_LEVELS) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, fan_in: int, fan_out: int, bias: bool = True) -> None:
        shapes[f"{name}.weight"] = (fan_out, fan_in)
        if bias:
            shapes[f"{name}.bias"] = (fan_out,)

    def conv(name: str, fan_in: int, fan_out: int, kernel: int) -> None:
        shapes[f"{name}.weight"] = (fan_out, fan_in, kernel, kernel)
        shapes[f"{name}.bias"] = (fan_out,)

    def norm(name: str, channels: int) -> None:
        shapes[f"{name}.weight"] = (channels,)
        shapes[f"{name}.bias"] = (channels,)

    def res_block(name: str, fan_in: int, fan_out: int) -> None:
        norm(f"{name}.in_layers.0", fan_in)
        conv(f"{name}.in_layers.2", fan_in, fan_out, 3)
        linear(f"{name}.emb_layers.1", TIME_DIM, fan_out)
        norm(f"{name}.out_layers.0", fan_out)
        conv(f"{name}.out_layers.3", fan_out, fan_out, 3)
        if fan_in != fan_out:
            conv(f"{name}.skip_connection", fan_in, fan_out, 1)

    def transformer(name: str, c: int) -> None:
        norm(f"{name}.norm", c)
        conv(f"{name}.proj_in", c, c, 1)
        block = f"{name}.transformer_blocks.0"
        for attn, context in (("attn1", c), ("attn2", CONTEXT_DIM)):
            linear(f"{block}.{attn}.to_q", c, c, bias=False)
            linear(f"{block}.{attn}.to_k", context, c, bias=False)
            linear(f"{block}.{attn}.to_v", context, c, bias=False)
            linear(f"{block}.{attn}.to_out.0", c, c)
        linear(f"{block}.ff.net.0.proj", c, 8 * c)  # GEGLU: two halves of 4c
        linear(f"{block}.ff.net.2", 4 * c, c)
        for n in ("norm1", "norm2", "norm3"):
            norm(f"{block}.{n}", c)
        conv(f"{name}.proj_out", c, c, 1)

    linear("time_embed.0", UNET_CHANNELS, TIME_DIM)
    linear("time_embed.2", TIME_DIM, TIME_DIM)
    conv("input_blocks.0.0", LATENT_CHANNELS, UNET_CHANNELS, 3)
    skips = [UNET_CHANNELS]
    channels, block = UNET_CHANNELS, 1
    for level, (mult, attention) in enumerate(levels):
        res_block(f"input_blocks.{block}.0", channels, mult * UNET_CHANNELS)
        channels = mult * UNET_CHANNELS
        if attention:
            transformer(f"input_blocks.{block}.1", channels)
        skips.append(channels)
        block += 1
        if level < len(levels) - 1:
            conv(f"input_blocks.{block}.0.op", channels, channels, 3)
            skips.append(channels)
            block += 1
    res_block("middle_block.0", channels, channels)
    transformer("middle_block.1", channels)
    res_block("middle_block.2", channels, channels)
    block = 0
    for level in reversed(range(len(levels))):
        mult, attention = levels[level]
        for i in range(2):  # one res block + 1 per level on the way up
            res_block(f"output_blocks.{block}.0", channels + skips.pop(), mult * UNET_CHANNELS)
            channels = mult * UNET_CHANNELS
            sub = 1
            if attention:
                transformer(f"output_blocks.{block}.1", channels)
                sub = 2
            if level > 0 and i == 1:
                conv(f"output_blocks.{block}.{sub}.conv", channels, channels, 3)
            block += 1
    norm("out.0", channels)
    conv("out.2", channels, LATENT_CHANNELS, 3)
    return shapes


def _random(shapes: dict[str, tuple[int, ...]], seed: int, std: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1 and name.endswith(".weight"):  # norm scales
            out[name] = 1.0 + 0.05 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            out[name] = 0.01 * torch.randn(shape, generator=g)
        else:
            out[name] = std * torch.randn(shape, generator=g)
    return out


# Three levels with attention everywhere, as SD1.5's first three (420M parameters): for benchmarks.
WIDE_LEVELS = ((1, True), (2, True), (4, True))


def tiny_unet_state_dict(seed: int = 0, std: float = 0.03, levels=TINY_LEVELS) -> dict[str, torch.Tensor]:
    """Bare UNet keys (diffusion_models layout), float32."""
    return _random(_unet_shapes(levels), seed, std)


def clip_l_state_dict(seed: int = 1, std: float = 0.02) -> dict[str, torch.Tensor]:
    """A CLIP-L text encoder in the Hugging Face layout ComfyUI's CLIPLoader reads, float32."""
    width, layers, vocab, positions = 768, 12, 49408, 77
    shapes: dict[str, tuple[int, ...]] = {
        "text_model.embeddings.token_embedding.weight": (vocab, width),
        "text_model.embeddings.position_embedding.weight": (positions, width),
        "text_model.final_layer_norm.weight": (width,),
        "text_model.final_layer_norm.bias": (width,),
        "text_projection.weight": (width, width),
    }
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}.self_attn.{proj}.weight"] = (width, width)
            shapes[f"{p}.self_attn.{proj}.bias"] = (width,)
        for n in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}.{n}.weight"] = (width,)
            shapes[f"{p}.{n}.bias"] = (width,)
        shapes[f"{p}.mlp.fc1.weight"] = (4 * width, width)
        shapes[f"{p}.mlp.fc1.bias"] = (4 * width,)
        shapes[f"{p}.mlp.fc2.weight"] = (width, 4 * width)
        shapes[f"{p}.mlp.fc2.bias"] = (width,)
    return _random(shapes, seed, std)


# Layers of the tiny UNet a LoRA patches: Linear (scaled in a converted file) and a 1x1 conv (not scaled).
LORA_TARGETS = {
    "input_blocks.3.1.transformer_blocks.0.attn2.to_k": (CONTEXT_DIM, UNET_CHANNELS),
    "input_blocks.3.1.transformer_blocks.0.attn1.to_q": (UNET_CHANNELS, UNET_CHANNELS),
    "middle_block.1.transformer_blocks.0.ff.net.2": (4 * UNET_CHANNELS, UNET_CHANNELS),
    "time_embed.0": (UNET_CHANNELS, TIME_DIM),
    "middle_block.1.proj_in": (UNET_CHANNELS, UNET_CHANNELS),
}
# Layers of CLIP-L a text-encoder LoRA patches (kohya names: lora_te_text_model_encoder_layers_<i>_<layer>).
CLIP_LORA_TARGETS = {
    "text_model.encoder.layers.0.self_attn.q_proj": (768, 768),
    "text_model.encoder.layers.5.self_attn.v_proj": (768, 768),
    "text_model.encoder.layers.11.mlp.fc1": (768, 3072),
    "text_model.encoder.layers.11.mlp.fc2": (3072, 768),
}


def _lora_state_dict(targets: dict[str, tuple[int, int]], prefix: str, seed: int, rank: int, std: float):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer, (fan_in, fan_out) in targets.items():
        name = prefix + layer.replace(".", "_")
        kernel = (1, 1) if layer.endswith("proj_in") else ()
        out[f"{name}.lora_down.weight"] = std * torch.randn((rank, fan_in, *kernel), generator=g)
        out[f"{name}.lora_up.weight"] = std * torch.randn((fan_out, rank, *kernel), generator=g)
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def tiny_lora_state_dict(seed: int = 2, rank: int = 4, std: float = 0.05) -> dict[str, torch.Tensor]:
    """A kohya-style LoRA (lora_unet_* keys) for the tiny UNet, strong enough to change its output clearly."""
    return _lora_state_dict(LORA_TARGETS, "lora_unet_", seed, rank, std)


def clip_lora_state_dict(seed: int = 4, rank: int = 4, std: float = 0.05) -> dict[str, torch.Tensor]:
    """A kohya-style text-encoder LoRA (lora_te_* keys) for CLIP-L."""
    return _lora_state_dict(CLIP_LORA_TARGETS, "lora_te_", seed, rank, std)


def taesd_state_dicts(seed: int = 3, std: float = 0.05) -> dict[str, dict[str, torch.Tensor]]:
    """Random weights for ComfyUI's tiny autoencoder ("taesd" in VAELoader): encoder and decoder files."""
    block = {"conv.0": (64, 64), "conv.2": (64, 64), "conv.4": (64, 64)}

    def layout(items: list) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for index, item in enumerate(items):
            if item == "block":
                for name, (fan_in, fan_out) in block.items():
                    shapes[f"{index}.{name}.weight"] = (fan_out, fan_in, 3, 3)
                    shapes[f"{index}.{name}.bias"] = (fan_out,)
            elif item is not None:  # a 3x3 conv: (in, out, bias)
                fan_in, fan_out, bias = item
                shapes[f"{index}.weight"] = (fan_out, fan_in, 3, 3)
                if bias:
                    shapes[f"{index}.bias"] = (fan_out,)
        return shapes

    down, up = (64, 64, False), None  # strided conv / parameter-free layers (clamp, ReLU, upsample)
    encoder = [
        (3, 64, True),
        "block",
        down,
        "block",
        "block",
        "block",
        down,
        "block",
        "block",
        "block",
        down,
        "block",
        "block",
        "block",
        (64, LATENT_CHANNELS, True),
    ]
    decoder = [
        up,
        (LATENT_CHANNELS, 64, True),
        up,
        "block",
        "block",
        "block",
        up,
        down,
        "block",
        "block",
        "block",
        up,
        down,
        "block",
        "block",
        "block",
        up,
        down,
        "block",
        (64, 3, True),
    ]
    return {"encoder": _random(layout(encoder), seed, std), "decoder": _random(layout(decoder), seed + 1, std)}


def write_models(models: Path, checkpoint_name: str, lora_name: str) -> list[str]:
    """The files the integration test needs, in ComfyUI's models folder; returns their paths relative to it.

    The checkpoint holds the UNet and CLIP-L under SD1.x checkpoint prefixes; the same weights are
    also written as standalone float32 / float16 files for ComfyUI's stock loaders to compare with.
    """
    unet, clip = tiny_unet_state_dict(), clip_l_state_dict()
    files = {
        f"checkpoints/{checkpoint_name}": {
            **{f"model.diffusion_model.{k}": v for k, v in unet.items()},
            **{f"cond_stage_model.transformer.{k}": v for k, v in clip.items()},
        },
        "diffusion_models/tiny_sd15_fp32.safetensors": unet,
        "diffusion_models/tiny_sd15_fp16.safetensors": {k: v.half() for k, v in unet.items()},
        "text_encoders/clip_l_fp32.safetensors": clip,
        f"loras/{lora_name}": tiny_lora_state_dict(),
        **{f"vae_approx/taesd_{part}.safetensors": sd for part, sd in taesd_state_dicts().items()},
    }
    for rel, tensors in files.items():
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(models / rel))
    return list(files)


if __name__ == "__main__":
    print(write_models(Path(sys.argv[1]), "tiny_sd15_checkpoint.safetensors", "tiny_lora.safetensors"))
