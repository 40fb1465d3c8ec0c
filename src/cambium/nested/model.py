"""The nested language model: token embedding, `n_levels` blocks of sliding-window attention composed with a memory,
RMSNorm, output head. Built from `cambium.nn` blocks (Attention with a window, SwiGLU, RMSNorm, MemoryLayer).

Legend: B batch (lanes), T tokens, D model width, V vocabulary.

Block (pre-norm), h = RMSNorm(x):
    mag:  x ← x + SWA(h) ⊙ σ(Memory(h))        Titans' memory-as-gate: the memory output gates the attention output
    swa:  x ← x + SWA(h)                       the baseline of the same window
    then  x ← x + SwiGLU(RMSNorm(x))

By default attention sees the window inside the current chunk only, and the memory, which carries its state across
chunks (context memory), is the only path by which a token sees text before its chunk. Passing each level's last
window − 1 attention inputs (`windows`, what `forward` returns) lets every token attend to a full window across the
chunk boundary (keys and values are recomputed from the carried inputs; RoPE is relative, so positions restart).

State lifetimes (NES-7): parameters (projections, gates, the learned initial memory) are the outer loop and are
serialised; the inner loop (memory updates token by token) runs inside `forward`; the final memory of each level is
returned as context memory, which the caller detaches and passes to the next chunk (`ContextMemory`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cambium.core.errors import CheckpointError
from cambium.nested.config import BUILT_COMPOSITIONS, ModelConfig
from cambium.nn.attention import Attention
from cambium.nn.memory import MemoryLayer, MemoryState
from cambium.nn.mlp import SwiGLU
from cambium.nn.norm import RMSNorm

__all__ = ["ContextMemory", "NestedBlock", "NestedLM", "count_parameters"]

LevelStates = list[MemoryState | None]
LevelWindows = list[torch.Tensor | None]


def windowed_attention(attn: Attention, h: torch.Tensor, past: torch.Tensor | None) -> torch.Tensor:
    """Sliding-window attention of the chunk h `[B, T, D]` over [past; h], past `[B, P, D]` (P < window) the inputs
    before the chunk → `[B, T, D]`. With no past it is `attn(h)`."""
    if past is None or past.shape[1] == 0:
        return attn(h)
    assert attn.window is not None and past.shape[1] < attn.window
    p, t = past.shape[1], h.shape[1]
    q, k, v = attn.project(torch.cat([past.to(h.dtype), h], dim=1))
    i = torch.arange(t, device=h.device)[:, None] + p
    j = torch.arange(p + t, device=h.device)[None, :]
    mask = (j <= i) & (i - j < attn.window)
    out = F.scaled_dot_product_attention(q[:, p:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=attn.head_dim**-0.5)
    return attn.wo(out.transpose(1, 2).flatten(2))


class NestedBlock(nn.Module):
    """One level: `[B, T, D]` → `[B, T, D]`, with the memory state carried in and out (None for swa)."""

    def __init__(self, cfg: ModelConfig, max_seq_len: int, seed: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.heads, window=cfg.window, max_seq_len=max_seq_len + cfg.window)
        self.memory = MemoryLayer(cfg.dim, cfg.heads, cfg.memory, seed=seed) if cfg.composition == "mag" else None
        self.norm2 = RMSNorm(cfg.dim)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor, state: MemoryState | None = None, past: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, MemoryState | None, torch.Tensor]:
        """x `[B, T, D]`, memory state, past attention inputs `[B, P, D]` → (`[B, T, D]`, memory state, the last
        window − 1 attention inputs `[B, P', D]`)."""
        h = self.norm1(x)
        a = windowed_attention(self.attn, h, past)
        if self.memory is not None:
            m, state = self.memory(h, state)
            a = a * torch.sigmoid(m)
        x = x + a
        keep = (self.attn.window or 1) - 1
        seen = h if past is None else torch.cat([past.to(h.dtype), h], dim=1)
        return x + self.mlp(self.norm2(x)), state, seen[:, seen.shape[1] - min(keep, seen.shape[1]):]


class NestedLM(nn.Module):
    """Tokens `[B, T]` (+ context memory per level) → logits `[B, T, V]` (+ the new context memory)."""

    def __init__(self, cfg: ModelConfig, max_seq_len: int) -> None:
        super().__init__()
        assert cfg.composition in BUILT_COMPOSITIONS, cfg.composition  # the config refuses the others at load
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.levels = nn.ModuleList(NestedBlock(cfg, max_seq_len, seed=i) for i in range(cfg.n_levels))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)

    @property
    def has_memory(self) -> bool:
        return self.cfg.composition == "mag"

    def forward(self, tokens: torch.Tensor, states: Sequence[MemoryState | None] | None = None,
                windows: Sequence[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, LevelStates, LevelWindows]:
        """tokens `[B, T]` int64, memory states and past attention inputs per level (None: the learned initial
        memory; the chunk only) → (logits `[B, T, V]`, memory states, attention inputs to carry)."""
        x = self.embed(tokens)
        states = list(states) if states is not None else [None] * len(self.levels)
        windows = list(windows) if windows is not None else [None] * len(self.levels)
        out: LevelStates = []
        seen: LevelWindows = []
        for level, state, past in zip(self.levels, states, windows, strict=True):
            x, new, window = level(x, state, past)
            out.append(new)
            seen.append(window)
        return self.head(self.norm(x)), out, seen


def count_parameters(cfg: ModelConfig, max_seq_len: int = 16) -> int:
    """Trainable parameters of the model `cfg` describes (the RoPE tables are buffers, not parameters)."""
    with torch.device("meta"):
        model = NestedLM(cfg, max_seq_len)
    return sum(p.numel() for p in model.parameters())


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits `[B, T, V]`, targets `[B, T]`."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class ContextMemory:
    """Context memory: the per-level memory state carried across chunks, `[B, ...]` per tensor, always detached.

    It persists across forward calls and is checkpointed next to the stream cursor (`state_dict` holds tensors).
    Before the first chunk it is empty and every level starts from its learned initial memory. `windows` holds each
    level's last window − 1 attention inputs `[B, P, D]`, for builds that carry attention across chunks too.
    """

    def __init__(self, n_levels: int) -> None:
        self.n_levels = n_levels
        self.states: LevelStates = [None] * n_levels
        self.windows: LevelWindows = [None] * n_levels

    def update(self, states: Sequence[MemoryState | None], windows: Sequence[torch.Tensor | None] | None = None
               ) -> None:
        self.states = [None if s is None else MemoryState(tuple(p.detach() for p in s.params),
                                                          tuple(o.detach() for o in s.opt)) for s in states]
        if windows is not None:
            self.windows = [None if w is None else w.detach() for w in windows]

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n_levels": self.n_levels}
        for i, s in enumerate(self.states):
            if s is not None:
                out.update({f"l{i}.params.{j}": p.clone() for j, p in enumerate(s.params)})
                out.update({f"l{i}.opt.{j}": o.clone() for j, o in enumerate(s.opt)})
        for i, w in enumerate(self.windows):
            if w is not None:
                out[f"l{i}.window"] = w.clone()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("n_levels") != self.n_levels:
            raise CheckpointError(f"context memory of {state.get('n_levels')} levels does not fit a model of "
                                  f"{self.n_levels}")
        self.states = []
        for i in range(self.n_levels):
            params = _indexed(state, f"l{i}.params.")
            opt = _indexed(state, f"l{i}.opt.")
            self.states.append(MemoryState(params, opt) if params else None)
        self.windows = [state.get(f"l{i}.window") for i in range(self.n_levels)]


def _indexed(state: dict[str, Any], prefix: str) -> tuple[torch.Tensor, ...]:
    keys = sorted((int(k[len(prefix):]), k) for k in state if k.startswith(prefix))
    return tuple(state[k] for _, k in keys)
