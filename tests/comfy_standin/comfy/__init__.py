"""Stand-in for the few `comfy` modules the pack uses (ComfyUI 0.3.64 signatures and behaviour)."""
