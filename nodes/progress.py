"""A conversion's progress, shown in ComfyUI: the node's progress bar, its current tensor, live layer stats."""

from __future__ import annotations

import logging
import sys
from typing import Any

from ..quant_core.report import LayerReport

log = logging.getLogger(__name__)

# Custom websocket event the front end (js/learned_rounding_fp16.js) listens to.
LAYER_EVENT = "learned_rounding_fp16.layer"


def layer_summary(layer: LayerReport) -> dict[str, Any]:
    """The part of a layer's report the node plots."""
    return {"name": layer.name, "relative_error": layer.relative_error, "exact_fraction": layer.exact_fraction}


def _prompt_server():
    """ComfyUI's running server, or None when the nodes run in a process without one (scripts, benchmarks)."""
    server = sys.modules.get("server")  # imported by main.py; importing it here would start building one
    prompt_server = getattr(server, "PromptServer", None)
    return getattr(prompt_server, "instance", None)


class NodeProgress:
    """quant_core's ProgressListener reporting to ComfyUI: the value checks as progress text, then one
    progress-bar step per tensor (with the tensor as progress text).

    Every ProgressBar update is also an interruption point in ComfyUI (its hook checks the cancel
    flag), in addition to the converter's own checks between chunks.
    """

    def __init__(self, node_id: str | None):
        self.node_id = node_id
        self.bar = None
        self.server = _prompt_server()

    def checking_values(self, name: str, done_bytes: int, total_bytes: int) -> None:
        """The checks before writing, as the node's progress text (ComfyUI's bar then counts tensors)."""
        if self.server is not None and self.node_id is not None:
            self.server.send_progress_text(f"checking values {100 * done_bytes // total_bytes}% {name}", self.node_id)

    def tensor_started(self, name: str, index: int, total: int) -> None:
        if self.bar is None:
            import comfy.utils

            self.bar = comfy.utils.ProgressBar(total, node_id=self.node_id)
        if self.server is not None and self.node_id is not None:
            self.server.send_progress_text(f"{index + 1}/{total} {name}", self.node_id)

    def tensor_finished(self, name: str, index: int, total: int, layer: LayerReport | None) -> None:
        self.bar.update_absolute(index + 1, total)
        if layer is not None:
            log.debug("%s: rel. error %.3e, %.1f%% exact", name, layer.relative_error, 100 * layer.exact_fraction)
            if self.server is not None and self.node_id is not None:
                event = {"node": self.node_id, "index": index, "total": total, "layer": layer_summary(layer)}
                self.server.send_sync(LAYER_EVENT, event, self.server.client_id)
