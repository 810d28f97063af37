"""Small building blocks shared by architecture plugins (public API).

RMSNorm, SwiGLU, rotary position embeddings and a helper to initialise weights the way
GPT-2 / nanoGPT do. Plugins may use them or bring their own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def swiglu_hidden(dim: int, multiple: int = 32) -> int:
    """The usual SwiGLU width: 8/3 x dim rounded up to a multiple (same FLOPs as a 4x MLP)."""
    return multiple * math.ceil(8 * dim / 3 / multiple)


class Rotary(nn.Module):
    """Rotary position embedding (RoPE) on the last dimension, half-split convention."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for integer ``positions`` ``[T]``, each ``[T, head_dim / 2]``."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return angles.cos(), angles.sin()

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``[..., T, head_dim]`` by angles for its ``T`` positions: with halves
        ``x1, x2``, ``(x1 cos - x2 sin, x2 cos + x1 sin)``, computed as
        ``x * (cos, cos) + roll(x, head_dim / 2) * (-sin, sin)`` (fewer, larger ops)."""
        xf = x.float()
        out = torch.addcmul(xf * torch.cat((cos, cos), -1), xf.roll(xf.shape[-1] // 2, -1), torch.cat((-sin, sin), -1))
        return out.to(x.dtype)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) for linear and embedding weights, zeros for biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)


def scale_residual_projections(module: nn.Module, names: tuple[str, ...], n_layers: int,
                               std: float = 0.02) -> None:
    """GPT-2's scaled init: output projections of residual branches get std / sqrt(2 n_layers)."""
    for pname, p in module.named_parameters():
        if pname.endswith(names):
            nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * n_layers))
