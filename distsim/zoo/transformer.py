"""A small pre-LayerNorm transformer encoder classifier (``kind = "transformer"`` of an
``[[arch]]``), its attention written out per head so that its weight-space
symmetries are visible.

    tokens: x (B, C, L) cut into L / patch patches of C * patch values -> linear embedding (d)
            + learned positions; a class token in front (pooling "cls") or none ("mean")
    block:  h = h + Attn(LN1(h));  h = h + MLP(LN2(h))
            Attn: per head j, q = z W_Q[j] + b_Q[j], k = z W_K[j] + b_K[j], v = z W_V[j] + b_V[j]
                  (d -> d_k each), softmax(q k^T / sqrt(d_k)) v, heads concatenated, W_O (+ b_O)
            MLP:  ReLU or GELU between d -> hidden -> d
    head:   LN, then the class token (or the mean over tokens), then linear (d -> classes)

A 2-D input (C, H, W) is read as H rows of C * W values (patch 1 over the rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TransformerConfig:
    """d_model, heads (d_k = d_model / heads), depth (blocks), mlp hidden width, activation
    ("relu" or "gelu"), patch (values of the length axis per token), pooling ("cls" or
    "mean"), input_shape (C, L) or (C, H, W), num_classes."""

    d_model: int = 16
    heads: int = 2
    depth: int = 1
    hidden: int = 32
    activation: str = "relu"
    patch: int = 4
    pooling: str = "cls"
    input_shape: tuple[int, ...] = (1, 40)
    num_classes: int = 2

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} must be a multiple of heads {self.heads}")
        if self.activation not in ("relu", "gelu") or self.pooling not in ("cls", "mean"):
            raise ValueError(f"activation must be relu or gelu and pooling cls or mean, got "
                             f"{self.activation!r}, {self.pooling!r}")
        if len(self.input_shape) == 2 and self.input_shape[1] % self.patch:
            raise ValueError(f"patch {self.patch} must divide the length {self.input_shape[1]}")

    @property
    def d_k(self) -> int:
        return self.d_model // self.heads

    @property
    def tokens(self) -> int:
        """Tokens per sample, the class token included."""
        n = (self.input_shape[1] // self.patch if len(self.input_shape) == 2
             else self.input_shape[1])
        return n + (self.pooling == "cls")

    @property
    def token_width(self) -> int:
        c = self.input_shape[0]
        return c * self.patch if len(self.input_shape) == 2 else c * self.input_shape[2]


def tokens(cfg: TransformerConfig, x: torch.Tensor) -> torch.Tensor:
    """Inputs (B, C, L) -> (B, L / patch, C * patch), a token per patch; (B, C, H, W) ->
    (B, H, C * W), a token per row."""
    b = x.shape[0]
    if x.dim() == 3:
        c, length = x.shape[1], x.shape[2]
        x = x.reshape(b, c, length // cfg.patch, cfg.patch).permute(0, 2, 1, 3)
        return x.reshape(b, length // cfg.patch, -1)
    return x.permute(0, 2, 1, 3).reshape(b, x.shape[2], -1)


class Block(nn.Module):
    """Pre-LN block: h + Attn(LN1(h)), then h + MLP(LN2(h)); per-head Q, K, V weights."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d, hd, dk = cfg.d_model, cfg.heads, cfg.d_k
        self.cfg = cfg
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.w_q = nn.Parameter(torch.randn(hd, d, dk) / math.sqrt(d))  # (heads, d, d_k)
        self.w_k = nn.Parameter(torch.randn(hd, d, dk) / math.sqrt(d))
        self.w_v = nn.Parameter(torch.randn(hd, d, dk) / math.sqrt(d))
        self.b_q = nn.Parameter(torch.zeros(hd, dk))
        self.b_k = nn.Parameter(torch.zeros(hd, dk))
        self.b_v = nn.Parameter(torch.zeros(hd, dk))
        self.w_o = nn.Parameter(torch.randn(hd, dk, d) / math.sqrt(d))  # (heads, d_k, d)
        self.b_o = nn.Parameter(torch.zeros(d))
        self.fc1 = nn.Linear(d, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.ln1(h)  # (B, T, d)
        q = torch.einsum("btd,hdk->bhtk", z, self.w_q) + self.b_q[:, None]  # (B, H, T, d_k)
        k = torch.einsum("btd,hdk->bhtk", z, self.w_k) + self.b_k[:, None]
        v = torch.einsum("btd,hdk->bhtk", z, self.w_v) + self.b_v[:, None]
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.cfg.d_k), dim=-1)
        h = h + torch.einsum("bhtk,hkd->btd", att @ v, self.w_o) + self.b_o
        act = torch.relu if self.cfg.activation == "relu" else nn.functional.gelu
        return h + self.fc2(act(self.fc1(self.ln2(h))))


class Transformer(nn.Module):
    """The encoder classifier of a TransformerConfig (module docstring)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Linear(cfg.token_width, d)
        self.pos = nn.Parameter(torch.randn(cfg.tokens, d) * 0.02)  # (T, d)
        self.cls = nn.Parameter(torch.zeros(d)) if cfg.pooling == "cls" else None
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.depth)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = self.embed(tokens(self.cfg, x))  # (B, N, d)
        if self.cls is not None:
            h = torch.cat([self.cls.expand(b, 1, -1), h], dim=1)
        h = self.blocks(h + self.pos)
        h = self.ln(h)
        return self.head(h[:, 0] if self.cls is not None else h.mean(dim=1))
