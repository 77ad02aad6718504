"""Stand-in for ComfyUI's `server.PromptServer`: what a node sends to the front end, kept in `sent`."""

from __future__ import annotations

from typing import Any


class PromptServer:
    instance: PromptServer | None = None

    def __init__(self) -> None:
        PromptServer.instance = self
        self.client_id: str | None = None
        self.sent: list[tuple[str, Any, str | None]] = []

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        self.sent.append((event, data, sid))

    def send_progress_text(self, text: str, node_id: str, sid: str | None = None) -> None:
        self.sent.append(("progress_text", {"node": node_id, "text": text}, sid))
