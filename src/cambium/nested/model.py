"""The nested language model: token embedding, `n_blocks` blocks composing attention with a memory, RMSNorm, output
head. Built from `cambium.nn` blocks (Attention, SwiGLU, RMSNorm, MemoryLayer) and the CMS levels (`cms.py`).

Legend: B batch (lanes), T tokens, D model width, V vocabulary, P persistent tokens, S segment length (mac).

Block (pre-norm), h = RMSNorm(x), Memory = the block's CMS levels combined (`CmsMemory`):
    mag:  x ← x + SWA(h) ⊙ σ(Memory(h))        Titans' memory-as-gate: the memory output gates the attention output
    mal:  x ← x + Memory(h);  x ← x + SWA(RMSNorm(x))          memory as a layer feeding sliding-window attention
    mac:  per segment s of S tokens: r = Memory.read(h_s) (the memory before the segment, queried by its tokens);
          y = Attn over [persistent; r; h_s] (r and h_s causal); write h_s into the memory;  x ← x + y
    swa:  x ← x + SWA(h)                        the baseline of the same window
    full: x ← x + Attn(h)                       full causal attention over the chunk
    then  x ← x + SwiGLU(RMSNorm(x))
With `persistent_tokens = P`, every attention also attends to P learned tokens (keys and values only), always visible.

By default attention sees the window inside the current chunk only, and the memory, which carries its state across
chunks (context memory), is the only path by which a token sees text before its chunk. Passing each block's last
window − 1 attention inputs (`windows`, what `forward` returns) lets every token attend to a full window across the
chunk boundary (keys and values are recomputed from the carried inputs; RoPE is relative, so positions restart).
In a mac block a memory token r_t is computed from token t, so query t' sees it only when t <= t' (no look-ahead).

State lifetimes (NES-7): parameters (projections, gates, the learned initial memory) are the outer loop and are
serialised; the inner loop (memory updates token by token) runs inside `forward`; the final memory of each CMS level
is returned as context memory, which the caller detaches and passes to the next chunk (`ContextMemory`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cambium.core.errors import CheckpointError
from cambium.nested.cms import CmsMemory, LevelStates
from cambium.nested.config import CmsConfig, ModelConfig
from cambium.nn.attention import Attention
from cambium.nn.memory import MemoryState
from cambium.nn.mlp import SwiGLU
from cambium.nn.norm import RMSNorm

__all__ = ["ContextMemory", "NestedBlock", "NestedLM", "attend", "count_parameters", "lm_loss"]

BlockStates = list[LevelStates | None]  # per block: one state per CMS level (None for a block without memory)
BlockWindows = list[torch.Tensor | None]
PLAIN = CmsConfig(periods=(1,))


def attend(attn: Attention, h: torch.Tensor, past: torch.Tensor | None = None, persistent: torch.Tensor | None = None,
           memory: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the chunk h `[B, T, D]` (queries) over [persistent `[P, D]`; memory tokens `[B, T, D]`; past
    `[B, P', D]` (P' < window); h] → `[B, T, D]`. Persistent tokens are always visible; memory token t is visible to
    queries t' >= t; past and h are causal within the window (if any). With none of the extras it is `attn(h)`."""
    if (past is None or past.shape[1] == 0) and persistent is None and memory is None:
        return attn(h)
    b, t, _ = h.shape
    parts = [] if persistent is None else [persistent.to(h.dtype).unsqueeze(0).expand(b, -1, -1)]
    n_pers = 0 if persistent is None else persistent.shape[0]
    n_mem = 0 if memory is None else memory.shape[1]
    n_past = 0 if past is None else past.shape[1]
    if memory is not None:
        parts.append(memory)
    if past is not None:
        assert attn.window is not None and n_past < attn.window
        parts.append(past.to(h.dtype))
    q, k, v = attn.project(torch.cat([*parts, h], dim=1))
    lead = n_pers + n_mem + n_past
    i = torch.arange(t, device=h.device)[:, None] + n_past  # the query's position in [past; h]
    j = torch.arange(n_past + t, device=h.device)[None, :]
    local = j <= i
    if attn.window is not None:
        local &= i - j < attn.window
    blocks = [torch.ones(t, n_pers, dtype=torch.bool, device=h.device)]
    if memory is not None:
        blocks.append(torch.arange(n_mem, device=h.device)[None, :] <= torch.arange(t, device=h.device)[:, None])
    mask = torch.cat([*blocks, local], dim=1)
    out = F.scaled_dot_product_attention(q[:, lead:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=attn.head_dim**-0.5)
    return attn.wo(out.transpose(1, 2).flatten(2))


class NestedBlock(nn.Module):
    """One block: `[B, T, D]` → `[B, T, D]`, with the CMS levels' memory states carried in and out (None without
    memory) and the last window − 1 attention inputs."""

    def __init__(self, cfg: ModelConfig, max_seq_len: int, seed: int, cms: CmsConfig = PLAIN) -> None:
        super().__init__()
        self.composition, self.segment_len = cfg.composition, cfg.segment_len
        self.norm1 = RMSNorm(cfg.dim)
        extra = (cfg.window or 0) + cfg.persistent_tokens + (cfg.segment_len or 0)
        self.attn = Attention(cfg.dim, cfg.heads, window=cfg.window, max_seq_len=max_seq_len + extra)
        self.memory = (CmsMemory(cfg.dim, cfg.heads, cfg.memory, cms.periods, cms.combine, seed=seed)
                       if cfg.has_memory else None)
        self.norm2 = RMSNorm(cfg.dim)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden)
        # Created after the blocks the plain MAG/SWA models have, so those initialise exactly as before.
        self.norm_attn = RMSNorm(cfg.dim) if cfg.composition == "mal" else None
        self.persistent = (nn.Parameter(0.02 * torch.randn(cfg.persistent_tokens, cfg.dim))
                           if cfg.persistent_tokens else None)

    def forward(self, x: torch.Tensor, state: Sequence[MemoryState | None] | None = None,
                past: torch.Tensor | None = None) -> tuple[torch.Tensor, LevelStates | None, torch.Tensor]:
        """x `[B, T, D]`, memory state per CMS level, past attention inputs `[B, P', D]` → (`[B, T, D]`, memory
        states, the last window − 1 attention inputs `[B, P'', D]`)."""
        h = self.norm1(x)
        new: LevelStates | None = None
        attn_in = h
        if self.composition == "mac":
            assert self.memory is not None and self.segment_len is not None
            states: Sequence[MemoryState | None] | None = state
            outs = []
            for s in range(0, h.shape[1], self.segment_len):
                seg = h[:, s:s + self.segment_len]
                read = self.memory.read(seg, states)
                outs.append(attend(self.attn, seg, None, self.persistent, read))
                _, states = self.memory(seg, states)
            new = list(states) if states is not None else None
            x = x + torch.cat(outs, dim=1)
        elif self.composition == "mal":
            assert self.memory is not None and self.norm_attn is not None
            m, new = self.memory(h, state)
            x = x + m
            attn_in = self.norm_attn(x)
            x = x + attend(self.attn, attn_in, past, self.persistent)
        else:
            a = attend(self.attn, h, past, self.persistent)
            if self.memory is not None:
                m, new = self.memory(h, state)
                a = a * torch.sigmoid(m)
            x = x + a
        keep = (self.attn.window or 1) - 1
        seen = attn_in if past is None else torch.cat([past.to(attn_in.dtype), attn_in], dim=1)
        return x + self.mlp(self.norm2(x)), new, seen[:, seen.shape[1] - min(keep, seen.shape[1]):]


class NestedLM(nn.Module):
    """Tokens `[B, T]` (+ context memory per block and CMS level) → logits `[B, T, V]` (+ the new context memory).
    `cms` None is one level of period 1: the plain memory."""

    def __init__(self, cfg: ModelConfig, max_seq_len: int, cms: CmsConfig | None = None) -> None:
        super().__init__()
        self.cfg, self.cms = cfg, cms or PLAIN
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(NestedBlock(cfg, max_seq_len, seed=i, cms=self.cms) for i in range(cfg.n_blocks))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)

    @property
    def has_memory(self) -> bool:
        return self.cfg.has_memory

    @property
    def n_levels(self) -> int:
        """CMS levels per block (0 without memory)."""
        return len(self.cms.periods) if self.has_memory else 0

    def level_parameters(self, level: int) -> list[nn.Parameter]:
        """The parameters of CMS level `level` in every block (what fires with it)."""
        return [p for block in self.blocks if isinstance(block, NestedBlock) and block.memory is not None
                for p in block.memory.levels[level].parameters()]

    def forward(self, tokens: torch.Tensor, states: Sequence[LevelStates | None] | None = None,
                windows: Sequence[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, BlockStates, BlockWindows]:
        """tokens `[B, T]` int64, memory states and past attention inputs per block (None: the learned initial
        memories; the chunk only) → (logits `[B, T, V]`, memory states, attention inputs to carry)."""
        x = self.embed(tokens)
        states = list(states) if states is not None else [None] * len(self.blocks)
        windows = list(windows) if windows is not None else [None] * len(self.blocks)
        out: BlockStates = []
        seen: BlockWindows = []
        for block, state, past in zip(self.blocks, states, windows, strict=True):
            x, new, window = block(x, state, past)
            out.append(new)
            seen.append(window)
        return self.head(self.norm(x)), out, seen


def count_parameters(cfg: ModelConfig, max_seq_len: int = 16, cms: CmsConfig | None = None) -> int:
    """Trainable parameters of the model `cfg` describes (the RoPE tables are buffers, not parameters)."""
    with torch.device("meta"):
        model = NestedLM(cfg, max_seq_len, cms)
    return sum(p.numel() for p in model.parameters())


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits `[B, T, V]`, targets `[B, T]`."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def _detached(state: MemoryState) -> MemoryState:
    return MemoryState(tuple(p.detach() for p in state.params), tuple(o.detach() for o in state.opt))


class ContextMemory:
    """Context memory: per block and CMS level, the memory state carried across chunks, `[B, ...]` per tensor, always
    detached.

    It persists across forward calls and is checkpointed next to the stream cursor (`state_dict` holds tensors).
    Before the first chunk it is empty and every level starts from its learned initial memory. A level that does not
    fire (`update(..., active=)`) keeps the state committed when it last fired. `windows` holds each block's last
    window − 1 attention inputs `[B, P, D]`, for builds that carry attention across chunks too.
    """

    def __init__(self, n_blocks: int, n_levels: int = 1) -> None:
        self.n_blocks, self.n_levels = n_blocks, n_levels
        self.states: BlockStates = [None] * n_blocks
        self.windows: BlockWindows = [None] * n_blocks

    def update(self, states: Sequence[Sequence[MemoryState | None] | None],
               windows: Sequence[torch.Tensor | None] | None = None, active: Sequence[bool] | None = None) -> None:
        new: BlockStates = []
        for old, block in zip(self.states, states, strict=True):
            if block is None:
                new.append(None)
                continue
            kept = list(old) if old is not None else [None] * len(block)
            new.append([_detached(s) if s is not None and (active is None or active[i]) else kept[i]
                        for i, s in enumerate(block)])
        self.states = new
        if windows is not None:
            self.windows = [None if w is None else w.detach() for w in windows]

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n_blocks": self.n_blocks, "n_levels": self.n_levels}
        for b, block in enumerate(self.states):
            for i, s in enumerate(block or []):
                if s is not None:
                    out.update({f"b{b}.l{i}.params.{j}": p.clone() for j, p in enumerate(s.params)})
                    out.update({f"b{b}.l{i}.opt.{j}": o.clone() for j, o in enumerate(s.opt)})
        for b, w in enumerate(self.windows):
            if w is not None:
                out[f"b{b}.window"] = w.clone()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shape = (state.get("n_blocks"), state.get("n_levels"))
        if shape != (self.n_blocks, self.n_levels):
            raise CheckpointError(f"context memory of {shape[0]} blocks × {shape[1]} levels does not fit a model of "
                                  f"{self.n_blocks} × {self.n_levels}")
        self.states = []
        for b in range(self.n_blocks):
            levels: LevelStates = []
            for i in range(self.n_levels):
                params = _indexed(state, f"b{b}.l{i}.params.")
                levels.append(MemoryState(params, _indexed(state, f"b{b}.l{i}.opt.")) if params else None)
            self.states.append(levels if any(s is not None for s in levels) else None)
        self.windows = [state.get(f"b{b}.window") for b in range(self.n_blocks)]


def _indexed(state: dict[str, Any], prefix: str) -> tuple[torch.Tensor, ...]:
    keys = sorted((int(k[len(prefix):]), k) for k in state if k.startswith(prefix))
    return tuple(state[k] for _, k in keys)
