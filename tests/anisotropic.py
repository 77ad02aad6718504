"""Generated layer inputs with the structure calibration exploits, and their recorded statistics."""

from __future__ import annotations

import torch
from torch import nn

from quant_core.calibration import InputStatistics, StatisticsRecorder


class Anisotropic:
    """Correlated inputs whose principal variances span three decades, with a non-zero mean."""

    def __init__(self, n: int, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)
        rotation = torch.linalg.qr(torch.randn(n, n, generator=self.g)).Q
        self.mix = rotation * torch.logspace(0, -3, n)[:, None]
        self.mean = torch.randn(n, generator=self.g) * 0.5

    def draw(self, tokens: int) -> torch.Tensor:
        return torch.randn(tokens, self.mix.shape[0], generator=self.g) @ self.mix + self.mean


def recorded(layer: nn.Linear, data: Anisotropic, batches: int = 4, **kwargs) -> InputStatistics:
    with StatisticsRecorder(layer, **kwargs) as recorder, torch.no_grad():
        for _ in range(batches):
            layer(data.draw(256))
    return recorder.statistics().for_layer("")
