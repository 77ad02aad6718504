"""Stand-in for `comfy.utils`' progress bar. The hook is what ComfyUI's server installs at start."""

from __future__ import annotations

from collections.abc import Callable

PROGRESS_BAR_ENABLED = True
PROGRESS_BAR_HOOK: Callable | None = None


def set_progress_bar_global_hook(function: Callable | None) -> None:
    global PROGRESS_BAR_HOOK
    PROGRESS_BAR_HOOK = function


class ProgressBar:
    def __init__(self, total: int, node_id: str | None = None):
        self.total = total
        self.current = 0
        self.hook = PROGRESS_BAR_HOOK  # taken at construction, as ComfyUI does
        self.node_id = node_id

    def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        if self.hook is not None:
            self.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value: int) -> None:
        self.update_absolute(self.current + value)
