"""Modules that look like attention to a careless matcher but are not attention.

Dense softmax attention is softmax over the last axis of a product q k^T, contracted over that
same axis with a third tensor. Each module here breaks exactly one part of that definition, so a
finder that reports any of them is matching syntax, not semantics. None may be reported.

Shapes: x is (B, N, C); every mixer returns a (B, N, C) residual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MIXER_KINDS",
    "SoftmaxOverQueries",
    "GramChain",
    "LinearAttentionMixer",
    "ChannelSoftmaxGate",
    "ClassifierHead",
    "build_mixer",
]

MIXER_KINDS = ("softmax_over_queries", "gram_chain", "linear_attention", "channel_softmax_gate")


class SoftmaxOverQueries(nn.Module):
    """softmax over the query axis of x x^T, then contracted over the key axis: the softmax is
    over a dimension the following matmul does not contract."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**-0.5
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = (x @ x.transpose(-2, -1)) * self.scale  # (B, N, N)
        weights = scores.softmax(dim=-2)
        return self.gamma * (weights @ x)


class GramChain(nn.Module):
    """(x x^T) x / N: a chain of matmuls with the attention shape and no softmax."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**-0.5
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gram = (x @ x.transpose(-2, -1)) * self.scale
        return self.gamma * (gram @ x) / x.shape[-2]


class LinearAttentionMixer(nn.Module):
    """Kernelised linear attention with the elu+1 feature map: phi(q) (phi(k)^T v) normalised by
    phi(q) . sum phi(k). Matmuls and a division, no softmax."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = F.elu(self.q(x)) + 1.0
        k = F.elu(self.k(x)) + 1.0
        v = self.v(x)
        kv = k.transpose(-2, -1) @ v  # (B, C, C)
        normaliser = q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1)  # (B, N, 1)
        return self.gamma * (q @ kv) / normaliser


class ChannelSoftmaxGate(nn.Module):
    """x * softmax(W x) over channels: a softmax that no matmul contracts."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x).softmax(dim=-1)


class ClassifierHead(nn.Module):
    """Mean-pooled tokens -> class probabilities: a softmax over classifier logits.

    Input (B, S, P, C); output (B, num_classes).
    """

    def __init__(self, dim: int, num_classes: int = 5) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(x.mean(dim=(1, 2)))
        return logits.softmax(dim=-1)


def build_mixer(kind: str, dim: int) -> nn.Module:
    classes = {
        "softmax_over_queries": SoftmaxOverQueries,
        "gram_chain": GramChain,
        "linear_attention": LinearAttentionMixer,
        "channel_softmax_gate": ChannelSoftmaxGate,
    }
    if kind not in classes:
        raise ValueError(f"unknown distractor mixer {kind!r}; choose from {MIXER_KINDS}")
    return classes[kind](dim)
