"""Language models for the text task, in plain ``torch.nn``; both map (B, L) token ids to (B, L,
vocab) logits and tie the output layer to the input embedding.

* ``LSTMLM``: the paper's model (Lin et al. 2020, after Merity et al.): an embedding, a stack of
  LSTM layers with dropout between them, and the tied decoder; the embedding width equals the
  hidden width (the paper: 3 layers of 650, dropout 0.4). ``forward`` starts from a zero state;
  ``carry`` starts from a given state and returns the final one, so training can carry it from one
  window of a column to the next (``tasks.TextTask``).
* ``GPT``: a decoder-only transformer: token and learned position embeddings, pre-LayerNorm blocks
  of causal self-attention (``torch.nn.functional.scaled_dot_product_attention``) and a GELU MLP of
  4·d, a final LayerNorm, the tied decoder. GPT-2's initialisation (normal 0.02, residual
  projections scaled by 1/sqrt(2·layers)).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from localsgd.harness.text import VOCAB

LSTMState = tuple[torch.Tensor, torch.Tensor]  # (h, c) of every layer


class LSTMLM(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(hidden, hidden, layers, dropout=dropout if layers > 1 else 0.0, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)
        self.decoder.weight = self.embed.weight  # tied
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.carry(tokens, None)[0]

    def carry(self, tokens: torch.Tensor, state: LSTMState | None) -> tuple[torch.Tensor, LSTMState]:
        """The logits of (B, L) ``tokens`` read from ``state`` (None: zeros) and the state after the
        last token: (h, c), each (layers, B, hidden)."""
        h, state = self.lstm(self.drop(self.embed(tokens)), state)
        return self.decoder(self.drop(h)), state


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(attn.transpose(1, 2).reshape(b, length, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


# The longest position table (window) of the GPT: GPT-2's. Attention costs grow with the square of
# the window; on a CPU a step at this length already takes seconds, and far longer windows seem to
# hang in the first forward pass.
MAX_CONTEXT = 1024


class GPT(nn.Module):
    def __init__(
        self, vocab: int, d: int, layers: int, heads: int, context: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"the width d = {d} must be a multiple of heads = {heads}")
        if not 1 <= context <= MAX_CONTEXT:
            raise ValueError(f"the context must be between 1 and {MAX_CONTEXT} positions, got {context}")
        self.context = context
        self.embed = nn.Embedding(vocab, d)
        self.position = nn.Embedding(context, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.decoder = nn.Linear(d, vocab, bias=False)
        self.decoder.weight = self.embed.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.context:
            raise ValueError(f"a window of {length} tokens is longer than the context {self.context}")
        positions = torch.arange(length, device=tokens.device)
        x = self.drop(self.embed(tokens) + self.position(positions))
        for block in self.blocks:
            x = block(x)
        return self.decoder(self.ln(x))


LANGUAGE_MODELS = ("gpt", "lstm")
# Defaults of the size settings: width, depth, heads (GPT only), dropout.
SIZES: dict[str, dict[str, int | float | None]] = {
    "gpt": {"width": 128, "depth": 4, "heads": 4, "dropout": 0.0},
    "lstm": {"width": 256, "depth": 2, "heads": None, "dropout": 0.0},
}


def build_language_model(name: str, size: dict[str, Any], context: int) -> nn.Module:
    """One of ``LANGUAGE_MODELS`` over byte tokens; ``size`` has SIZES' keys (None: the default);
    ``context``: the longest window (the GPT's position table)."""
    if name not in SIZES:
        raise ValueError(f"unknown language model {name!r}; choose one of {', '.join(LANGUAGE_MODELS)}")
    s = {key: default if size.get(key) is None else size[key] for key, default in SIZES[name].items()}
    if name == "gpt":
        return GPT(VOCAB, s["width"], s["depth"], s["heads"], context, s["dropout"])
    return LSTMLM(VOCAB, s["width"], s["depth"], s["dropout"])
