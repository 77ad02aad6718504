"""Stand-in for `comfy.model_management`: the cancel flag (set by ComfyUI's /interrupt) and the device."""

from __future__ import annotations

import threading

import torch

_lock = threading.RLock()
_interrupted = False


class InterruptProcessingException(Exception):
    pass


def interrupt_current_processing(value: bool = True) -> None:
    global _interrupted
    with _lock:
        _interrupted = value


def processing_interrupted() -> bool:
    with _lock:
        return _interrupted


def throw_exception_if_processing_interrupted() -> None:
    global _interrupted
    with _lock:
        if _interrupted:
            _interrupted = False
            raise InterruptProcessingException()


def get_torch_device() -> torch.device:
    return torch.device("cpu")  # as ComfyUI started with --cpu
