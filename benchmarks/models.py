"""The byte-level GPT that the benchmarks and experiments train, its loss and its data.

This module owns ``ByteGPT``, the one model of ``train.py``, ``train_loop.py``,
``pam_experiment.py`` and ``warmup_experiment.py``: a GPT-style decoder over bytes (token and
position embeddings, pre-LN blocks with causal self-attention and a 4x GELU MLP, a final
LayerNorm, an output head without bias, untied or tied to the token embedding; GPT-2's
initialization), whose linear layers are ``torch.nn.Linear`` or a subclass with the same
constructor (``fusedwarm.pam.Linear`` in the PAM runs). It also owns the loss (``byte_loss``,
``loss_of``: cross-entropy in nats per byte) and the data: the bytes of the standard library's
source files that ``train.py`` and ``train_loop.py`` read (``load_text``), and the batches of
random windows drawn from a text with a fixed seed (``make_batches``, on the window sampler of
``fusedwarm.demo``, whose text the two experiments train on).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fusedwarm.demo import batches

VOCAB = 256  # bytes


def load_text(limit: int) -> tuple[torch.Tensor, list[str]]:
    """The bytes of the standard library's top-level ``.py`` files, in sorted order, up to ``limit``.

    Returns the bytes as a uint8 tensor and the names of the files used.
    """
    stdlib = Path(os.path.dirname(os.__file__))
    parts, names, size = [], [], 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        parts.append(data[: limit - size])
        names.append(path.name)
        size += len(parts[-1])
        if size >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8), names


def make_batches(text: torch.Tensor, count: int, batch: int, seq: int, seed: int,
                 device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` (input, target) pairs of ``batch`` random ``seq``-byte windows, targets shifted by one."""
    out = []
    for window in batches(text, count, batch, seq, seed):
        window = window.to(device)
        out.append((window[:, :-1].contiguous(), window[:, 1:].contiguous()))
    return out


class Block(nn.Module):
    """Pre-LN transformer block: causal multi-head self-attention, then a 4x GELU MLP."""

    def __init__(self, dim: int, heads: int, linear: type[nn.Linear] = nn.Linear) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = linear(dim, 3 * dim)
        self.proj = linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = linear(dim, 4 * dim)
        self.out = linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class ByteGPT(nn.Module):
    """A GPT-style decoder over bytes: embeddings, ``layers`` blocks, final LayerNorm, output head.

    Args:
        layers: transformer blocks.
        dim: model width; ``heads`` must divide it.
        heads: attention heads.
        seq: the longest input (positions embedded).
        tie: share the output head's weight with the token embedding.
        linear: the class of every linear layer, ``torch.nn.Linear`` or a subclass with its
            constructor (e.g. ``fusedwarm.pam.Linear``).
    """

    def __init__(self, layers: int, dim: int, heads: int, seq: int, tie: bool = False,
                 linear: type[nn.Linear] = nn.Linear) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, linear) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = linear(dim, VOCAB, bias=False)
        if tie:
            self.head.weight = self.tok.weight
        for m in self.modules():  # GPT-2's initialization
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (batch, seq, 256) for the byte after each position of ``idx`` (batch, seq)."""
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def byte_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (nats/byte) of ``logits`` (..., 256), computed in float32, against the bytes ``targets``."""
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1), reduction=reduction)


def loss_of(model: nn.Module, xy: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``model`` on windows ``xy`` (batch, length + 1): bytes [:-1] in, [1:] predicted."""
    return byte_loss(model(xy[:, :-1]), xy[:, 1:])
