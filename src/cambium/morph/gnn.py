"""MOR-6: Tamiyo's learned policy — a graph neural network over the model graph (PyTorch Geometric).

The graph is rebuilt from the SystemStatePacket alone (so a Tamiyo service deciding over HTTP sees what an embedded
one sees):
- a node per seed slot, features = its epoch telemetry and lifecycle view (`SEED_FEATURES`);
- a node per host module the seeds sit in: the module each seed follows and every enclosing module up to the root
  (`stages.1.0` → `stages.1` → `stages` → the model), telemetry features zero;
- edges, both directions: seed i ↔ seed i+1 (slot order, the data flow of a sequential host), seed ↔ the module it
  follows, module ↔ its parent module.
Every node also carries the boundary's global features (adaptation budget left, log training loss).

Network (`TamiyoGNN`): a linear encoder, `layers` residual rounds of `MeanConv` (h ← h + ReLU(W_r h_i + W_n ·
mean_{j∈N(i)} h_j)), then three heads on the seed nodes: germinate-or-wait (one logit), which blueprint (a logit per
name of the policy's vocabulary) and a value (the behaviour policy's expected reward there, Simic's AWR baseline).
`MeanConv.dense` is the slow reference: the same layer as a dense row-normalised adjacency product.

Masking: a seed may germinate only if it is DORMANT, not embargoed (epoch >= embargo_until), has telemetry in the
packet and at least one legal blueprint; a blueprint is legal at a seed if the PolicyConfig lists it for the seed's
layout (conv, tokens, flat) and it is in the vocabulary. Illegal logits are -inf. `GnnPolicy.decide` germinates the
legal seeds with p(germinate) > 0.5, most probable first, up to the budget left, each with its most probable legal
blueprint (no CULL head: the lifecycle's gates end adaptations, and AdaptationKind has only GERMINATE and WAIT).

Files: `save_policy` writes safetensors whose header metadata holds a JSON header (`cambium_policy`) with the
architecture, vocabulary, Simic's figures and `tensors_sha256`, the sha256 over every tensor's name, dtype, shape and
bytes; `load_policy` recomputes it and refuses a file that differs (one-line PolicyFileError).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch_geometric.nn import MessagePassing

from cambium.core.errors import DataError
from cambium.morph.config import PolicyConfig
from cambium.morph.contracts import AdaptationKind, AdaptationSignal, SeedState, SystemStatePacket

__all__ = [
    "FORMAT",
    "N_FEATURES",
    "SEED_FEATURES",
    "GnnPolicy",
    "MeanConv",
    "PolicyFileError",
    "PolicyGraph",
    "TamiyoGNN",
    "build_graph",
    "layouts_of",
    "load_policy",
    "save_policy",
    "tensors_sha256",
    "vocabulary",
]

FORMAT = "cambium-morph-gnn/1"
STATES = tuple(SeedState)
SEED_FEATURES = (
    "is_seed", "is_module", "health", "confidence", "dead", "log_var", "log_mean", "log_grad", "log_samples",
    "has_telemetry", *(f"state_{s.value.lower()}" for s in STATES), "embargoed", "failures", "layout_flat",
    "layout_tokens", "layout_conv", "log_channels", "position", "alpha", "epochs_in_state", "budget_left",
    "log_train_loss", "depth",
)
N_FEATURES = len(SEED_FEATURES)
_F = {name: k for k, name in enumerate(SEED_FEATURES)}
_LAYOUT = {2: "layout_flat", 3: "layout_tokens", 4: "layout_conv"}


class PolicyFileError(DataError):
    """A policy file is missing, not a cambium GNN policy, or its tensors do not hash to its header."""


def layouts_of(cfg: PolicyConfig) -> dict[int, tuple[str, ...]]:
    """Blueprints the config allows per activation rank (2 flat, 3 tokens, 4 conv)."""
    return {2: cfg.blueprints_flat, 3: cfg.blueprints_tokens, 4: cfg.blueprints_conv}


def vocabulary(cfg: PolicyConfig) -> tuple[str, ...]:
    """Every blueprint name the config lists, in first-listed order (the blueprint head's classes)."""
    out: list[str] = []
    for names in (cfg.blueprints_conv, cfg.blueprints_tokens, cfg.blueprints_flat):
        out += [n for n in names if n not in out]
    return tuple(out)


@dataclass
class PolicyGraph:
    """The graph of one packet: node features `x [N, F]`, `edge_index [2, E]`, the node row of each seed
    (`seed_index [S]`, seeds in slot order), the germination mask `legal [S]` and the blueprint mask
    `bp_legal [S, V]`."""

    x: torch.Tensor
    edge_index: torch.Tensor
    seed_index: torch.Tensor
    seed_ids: list[str]
    legal: torch.Tensor
    bp_legal: torch.Tensor


def _slog(v: float) -> float:
    return math.copysign(math.log1p(abs(v)), v) if math.isfinite(v) else 0.0


def build_graph(packet: SystemStatePacket, vocab: tuple[str, ...], layouts: dict[int, tuple[str, ...]],
                budget: int) -> PolicyGraph:
    seeds = sorted(packet.seeds, key=lambda s: s.index)
    health = {h.seed_id: h for h in packet.health}
    n_seeds = len(seeds)
    modules: dict[str, int] = {}
    for s in seeds:
        parts = s.location.split(".")
        for k in range(len(parts), -1, -1):
            modules.setdefault(".".join(parts[:k]), 0)
    module_names = sorted(modules, key=lambda m: (m.count(".") + (m != ""), m))
    for k, m in enumerate(module_names):
        modules[m] = n_seeds + k
    # Rows are built as Python lists and become one tensor at the end (per-element tensor writes cost ~µs each).
    base = [0.0] * N_FEATURES
    base[_F["budget_left"]] = max(budget - packet.adaptations_this_epoch, 0) / max(budget, 1)
    base[_F["log_train_loss"]] = _slog(packet.train_loss)
    rows = [base.copy() for _ in range(n_seeds + len(modules))]
    legal: list[bool] = []
    bp_legal: list[list[bool]] = []
    src: list[int] = []
    dst: list[int] = []

    def edge(a: int, b: int) -> None:
        src.extend((a, b))
        dst.extend((b, a))

    for i, s in enumerate(seeds):
        row = rows[i]
        row[_F["is_seed"]] = 1.0
        h = health.get(s.seed_id)
        if h is not None:
            row[_F["health"]], row[_F["confidence"]], row[_F["dead"]] = h.health_score, h.confidence, h.dead_unit_ratio
            row[_F["log_var"]] = _slog(h.activation_variance)
            row[_F["log_mean"]] = _slog(h.activation_mean)
            row[_F["log_grad"]] = _slog(h.gradient_norm)
            row[_F["log_samples"]] = math.log1p(h.samples) / 4
            row[_F["has_telemetry"]] = 1.0
        row[_F[f"state_{s.state.value.lower()}"]] = 1.0
        embargoed = packet.epoch < s.embargo_until
        row[_F["embargoed"]] = float(embargoed)
        row[_F["failures"]] = s.failures / (1 + s.failures)
        rank = len(s.shape)
        if rank in _LAYOUT:
            row[_F[_LAYOUT[rank]]] = 1.0
        channel = s.shape[1] if rank == 4 else (s.shape[-1] if rank else 1)
        row[_F["log_channels"]] = math.log2(channel) / 10 if isinstance(channel, int) and channel > 0 else 0.0
        row[_F["position"]] = i / max(n_seeds - 1, 1)
        row[_F["alpha"]] = s.alpha
        row[_F["epochs_in_state"]] = min(max(packet.epoch - s.state_epoch, 0), 10) / 10
        row[_F["depth"]] = s.location.count(".") / 5
        allowed = layouts.get(rank, ())
        mask = [name in allowed for name in vocab]
        bp_legal.append(mask)
        legal.append(s.state == SeedState.DORMANT and not embargoed and h is not None and any(mask))
        edge(i, modules[s.location])
        if i + 1 < n_seeds:
            edge(i, i + 1)
    for m, node in modules.items():
        rows[node][_F["is_module"]] = 1.0
        rows[node][_F["depth"]] = (m.count(".") + (m != "")) / 5
        if m:
            edge(node, modules[m.rsplit(".", 1)[0] if "." in m else ""])
    x = torch.tensor(rows, dtype=torch.float32).reshape(-1, N_FEATURES)
    return PolicyGraph(x, torch.tensor([src, dst], dtype=torch.long).reshape(2, -1),
                       torch.arange(n_seeds), [s.seed_id for s in seeds], torch.tensor(legal, dtype=torch.bool),
                       torch.tensor(bp_legal, dtype=torch.bool).reshape(n_seeds, len(vocab)))


class MeanConv(MessagePassing):
    """h_i' = W_r h_i + W_n · mean_{j ∈ N(i)} h_j (+ b); a node without neighbours gets W_r h_i + b."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__(aggr="mean")
        self.root = nn.Linear(dim_in, dim_out)
        self.neighbour = nn.Linear(dim_in, dim_out, bias=False)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.root(x) + self.neighbour(self.propagate(edge_index, x=x))

    def message(self, x_j: torch.Tensor) -> torch.Tensor:
        return x_j

    def dense(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        """Slow reference: `adj [N, N]` with adj[i, j] = number of edges j → i."""
        deg = adj.sum(1, keepdim=True).clamp(min=1)
        return self.root(x) + self.neighbour((adj @ x) / deg)


class TamiyoGNN(nn.Module):
    def __init__(self, n_features: int, hidden: int, layers: int, n_blueprints: int) -> None:
        super().__init__()
        self.encode = nn.Linear(n_features, hidden)
        self.convs = nn.ModuleList(MeanConv(hidden, hidden) for _ in range(layers))
        self.germ = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.blueprint = nn.Linear(hidden, n_blueprints)
        self.value = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def _heads(self, h: torch.Tensor, seed_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hs = h[seed_index]
        return self.germ(hs).squeeze(-1), self.blueprint(hs), self.value(hs).squeeze(-1)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, seed_index: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(germinate logits [S], blueprint logits [S, V], values [S]) for the seed nodes `seed_index`."""
        h = torch.relu(self.encode(x))
        for conv in self.convs:
            h = h + torch.relu(conv(h, edge_index))
        return self._heads(h, seed_index)

    def forward_dense(self, x: torch.Tensor, adj: torch.Tensor, seed_index: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same network through `MeanConv.dense` (the reference of the message passing)."""
        h = torch.relu(self.encode(x))
        for conv in self.convs:
            h = h + torch.relu(conv.dense(h, adj))  # type: ignore[operator]
        return self._heads(h, seed_index)


def masked(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~mask, -math.inf)


class GnnPolicy:
    """A `cambium.morph.controller.Policy` deciding with a trained TamiyoGNN (`latencies_ms` as the heuristic's:
    the wall time of each `decide`, graph building included)."""

    kind = "gnn"

    def __init__(self, net: TamiyoGNN, header: dict[str, Any], cfg: PolicyConfig, max_adaptations_per_epoch: int
                 ) -> None:
        self.net = net.eval()
        self.header = header
        self.cfg = cfg
        self.max_adaptations = max_adaptations_per_epoch
        self.vocab: tuple[str, ...] = tuple(header["vocabulary"])
        self.layouts = layouts_of(cfg)
        self.latencies_ms: list[float] = []

    @classmethod
    def from_file(cls, path: str | Path, cfg: PolicyConfig, max_adaptations_per_epoch: int) -> GnnPolicy:
        net, header = load_policy(path)
        return cls(net, header, cfg, max_adaptations_per_epoch)

    def with_settings(self, cfg: PolicyConfig, max_adaptations_per_epoch: int) -> GnnPolicy:
        """The same network with other blueprint lists / budget (and fresh latencies)."""
        return GnnPolicy(self.net, self.header, cfg, max_adaptations_per_epoch)

    @torch.inference_mode()
    def scores(self, packet: SystemStatePacket) -> tuple[PolicyGraph, torch.Tensor, torch.Tensor]:
        """(graph, p(germinate) [S] with 0 where illegal, masked blueprint logits [S, V])."""
        g = build_graph(packet, self.vocab, self.layouts, self.max_adaptations)
        germ, bp, _ = self.net(g.x, g.edge_index, g.seed_index)
        p = torch.sigmoid(germ).masked_fill(~g.legal, 0.0)
        return g, p, masked(bp, g.bp_legal)

    def decide(self, packet: SystemStatePacket) -> list[AdaptationSignal]:
        t0 = time.perf_counter()
        g, p, bp = self.scores(packet)
        budget = max(self.max_adaptations - packet.adaptations_this_epoch, 0)
        order = sorted((i for i in range(len(g.seed_ids)) if p[i] > 0.5), key=lambda i: -float(p[i]))[:budget]
        out = [
            AdaptationSignal(
                kind=AdaptationKind.GERMINATE, seed_id=g.seed_ids[i], blueprint_name=self.vocab[int(bp[i].argmax())],
                confidence=float(p[i]), reason=f"gnn p(germinate) {float(p[i]):.3f}", epoch=packet.epoch,
            )
            for i in order
        ]
        self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        return out

    def explain(self, packet: SystemStatePacket) -> dict[str, str]:
        g, p, bp = self.scores(packet)
        out = {}
        for i, seed_id in enumerate(g.seed_ids):
            if not g.legal[i]:
                out[seed_id] = "not a legal germination (state, embargo, telemetry or blueprint mask)"
            else:
                best = self.vocab[int(bp[i].argmax())]
                out[seed_id] = f"{'candidate' if p[i] > 0.5 else 'wait'}: p(germinate) {float(p[i]):.3f}, {best}"
        return out


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_policy(path: str | Path, net: TamiyoGNN, header: dict[str, Any]) -> str:
    """Write `net` and `header` (architecture keys: hidden, layers, vocabulary) as safetensors; returns the hash."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    sha = tensors_sha256(tensors)
    full = {**header, "format": FORMAT, "features": list(SEED_FEATURES), "tensors_sha256": sha}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    save_file(tensors, str(tmp), metadata={"cambium_policy": json.dumps(full, sort_keys=True)})
    tmp.replace(path)
    return sha


def load_policy(path: str | Path) -> tuple[TamiyoGNN, dict[str, Any]]:
    """The network and header of a policy file, its tensors verified against the header's hash."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise PolicyFileError(f"policy file {p} does not exist; train one with `cambium morph simic`")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PolicyFileError(f"policy file {p} is not a safetensors file: {str(exc).splitlines()[0][:200]}") from None
    try:
        header = json.loads(meta["cambium_policy"])
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r}, expected {FORMAT!r}")
        if header.get("features") != list(SEED_FEATURES):
            raise ValueError("its node features differ from this cambium's (retrain it with `cambium morph simic`)")
        hidden, layers, vocab = int(header["hidden"]), int(header["layers"]), list(header["vocabulary"])
        if not (1 <= hidden <= 4096 and 0 <= layers <= 64 and vocab and all(isinstance(v, str) for v in vocab)):
            raise ValueError(f"architecture hidden={hidden} layers={layers} vocabulary={vocab[:10]} out of range")
    except (KeyError, ValueError, TypeError) as exc:
        raise PolicyFileError(f"policy file {p} has no valid cambium policy header: {exc}") from None
    actual = tensors_sha256(tensors)
    if actual != header.get("tensors_sha256"):
        raise PolicyFileError(f"policy file {p}: tensors hash to {actual[:12]}..., the header says "
                              f"{str(header.get('tensors_sha256'))[:12]}...: modified or corrupted")
    net = TamiyoGNN(N_FEATURES, hidden, layers, len(vocab))
    try:
        net.load_state_dict(tensors)
    except RuntimeError as exc:
        raise PolicyFileError(f"policy file {p} does not match its header's architecture: "
                              f"{str(exc).splitlines()[0][:200]}") from None
    return net, header
