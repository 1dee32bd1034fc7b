"""RMSNorm as DeepSeek-V2 computes it: statistics in fp32, scale applied after casting back (lean.py: backward
keeps x as it came and the fp32 1/rms, not an fp32 copy of x)."""

import torch
from torch import nn

from .lean import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
