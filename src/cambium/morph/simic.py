"""Simic: trains Tamiyo's GNN policy (cambium.morph.gnn) offline from Urza's replay buffer (morph.field_reports).

Data: every recorded boundary becomes one graph; every seed that could legally germinate there is one sample whose
action is what the behaviour policy did (wait, or germinate with blueprint b) and whose reward is that action's
(`field_reports.reward_of`: 0 for waiting; the FieldReport's outcome for a germination; unknown if the run ended
before the adaptation did).

Objective: behaviour cloning weighted by advantage — advantage-weighted regression (AWR, Peng et al. 2019), in its
one-step form, since each germination's reward is credited to the decision that started it:

    V(s)   value head, regressed on the observed rewards of the behaviour's actions (MSE): the baseline
    A      = r - V(s) (V detached); w = min(exp(A / beta), w_max); w = 1 where the reward is unknown
    loss   = mean(w · BCE(germinate logit, germinated?)) + mean over germinations(w · CE(blueprint logits, b))
             + value loss

`beta = 0` turns the weights off: pure behaviour cloning. AWR (rather than IQL) because with one-step rewards the
learned baseline is all an advantage needs, and the policy it yields stays inside the behaviour's support (a
germination the data never saw succeed is not favoured). Illegal actions are masked in both heads.

Evaluation: the recorded runs are split by run (whole runs held out, `val_fraction`; by boundary if there is only one
run). On the held-out boundaries `GnnPolicy.decide` (budget included) is compared, per legal seed, with the
behaviour's action: imitation accuracy, against the expected accuracy of a uniformly random legal action, and the
mean reward of the held-out germinations the GNN repeats vs those it would not.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch_geometric.data import Batch, Data

from cambium.core.errors import DataError
from cambium.core.progress import get_logger
from cambium.morph.config import PolicyConfig
from cambium.morph.contracts import AdaptationKind
from cambium.morph.field_reports import Experience, load_experience, reward_of
from cambium.morph.gnn import N_FEATURES, GnnPolicy, TamiyoGNN, build_graph, layouts_of, save_policy, vocabulary
from cambium.morph.library import Urza

__all__ = ["SimicConfig", "SimicResult", "evaluate", "to_data", "train_simic"]

log = get_logger("cambium.morph.simic")


@dataclass
class SimicConfig:
    hidden: int = 64
    layers: int = 3
    epochs: int = 150
    lr: float = 3e-3
    batch_graphs: int = 32
    beta: float = 1.0
    """AWR temperature; 0 = pure behaviour cloning."""
    w_max: float = 20.0
    val_fraction: float = 0.25
    seed: int = 0


@dataclass
class SimicResult:
    net: TamiyoGNN
    header: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)


def to_data(exp: Experience, vocab: tuple[str, ...], layouts: dict[int, tuple[str, ...]]) -> Data:
    """One boundary as a PyG graph with the behaviour's action and reward per seed (`y_germ`, `y_bp` (-1: none or
    not in the vocabulary), `reward` (nan: unknown))."""
    rec = exp.record
    g = build_graph(rec.packet, vocab, layouts, rec.budget)
    chosen = {s.seed_id: s.blueprint_name for s in rec.signals if s.kind == AdaptationKind.GERMINATE}
    n = len(g.seed_ids)
    y_germ = torch.zeros(n)
    y_bp = torch.full((n,), -1, dtype=torch.long)
    reward = torch.zeros(n)
    for i, seed_id in enumerate(g.seed_ids):
        if seed_id in chosen:
            y_germ[i] = 1.0
            name = chosen[seed_id]
            if name in vocab and g.bp_legal[i, vocab.index(name)]:
                y_bp[i] = vocab.index(name)
            rep = exp.outcomes.get(seed_id)
            reward[i] = reward_of(rep) if rep is not None else math.nan
    return Data(x=g.x, edge_index=g.edge_index, seed_index=g.seed_index, legal=g.legal, bp_legal=g.bp_legal,
                y_germ=y_germ, y_bp=y_bp, reward=reward, num_nodes=g.x.shape[0])


def _loss(net: TamiyoGNN, b: Batch, beta: float, w_max: float) -> torch.Tensor:
    germ, bp, value = net(b.x, b.edge_index, b.seed_index)
    legal = b.legal
    known = legal & ~torch.isnan(b.reward)
    r = torch.nan_to_num(b.reward)
    value_loss = ((value - r)[known] ** 2).mean() if known.any() else germ.sum() * 0
    if beta > 0:
        adv = (r - value.detach()).clamp(max=w_max * beta)
        w = torch.where(known, torch.exp(adv / beta).clamp(max=w_max), torch.ones_like(r))
    else:
        w = torch.ones_like(r)
    bce = nn.functional.binary_cross_entropy_with_logits(germ, b.y_germ, reduction="none")
    germ_loss = (w * bce)[legal].sum() / legal.sum().clamp(min=1)
    has_bp = legal & (b.y_bp >= 0)
    if has_bp.any():
        logits = bp.masked_fill(~b.bp_legal, -1e9)[has_bp]
        ce = nn.functional.cross_entropy(logits, b.y_bp[has_bp], reduction="none")
        bp_loss = (w[has_bp] * ce).mean()
    else:
        bp_loss = germ.sum() * 0
    return germ_loss + bp_loss + value_loss


def evaluate(policy: GnnPolicy, experiences: list[Experience]) -> dict[str, float]:
    """Per legal seed of each boundary: does `policy.decide` take the behaviour's action (wait / germinate with the
    same blueprint)? With the random-policy expectation and the rewards of the germinations it repeats or not."""
    hits, samples, random_hits = 0, 0, 0.0
    kept: list[float] = []
    dropped: list[float] = []
    for exp in experiences:
        rec = exp.record
        mine = {s.seed_id: s.blueprint_name for s in policy.decide(rec.packet)}
        theirs = {s.seed_id: s.blueprint_name for s in rec.signals if s.kind == AdaptationKind.GERMINATE}
        g = build_graph(rec.packet, policy.vocab, policy.layouts, rec.budget)
        for i, seed_id in enumerate(g.seed_ids):
            if not g.legal[i]:
                continue
            samples += 1
            hits += mine.get(seed_id) == theirs.get(seed_id)
            random_hits += 1.0 / (1 + int(g.bp_legal[i].sum()))
            rep = exp.outcomes.get(seed_id)
            if seed_id in theirs and rep is not None:
                (kept if seed_id in mine else dropped).append(reward_of(rep))
    return {
        "samples": samples,
        "accuracy": hits / max(samples, 1),
        "random_accuracy": random_hits / max(samples, 1),
        "germinations_with_outcome": len(kept) + len(dropped),
        "repeated": len(kept),
        "mean_reward_repeated": sum(kept) / len(kept) if kept else math.nan,
        "mean_reward_not_repeated": sum(dropped) / len(dropped) if dropped else math.nan,
    }


def _split(exps: list[Experience], fraction: float, seed: int) -> tuple[list[Experience], list[Experience]]:
    runs = sorted({e.record.run_id for e in exps})
    rng = random.Random(seed)
    if len(runs) >= 2:
        rng.shuffle(runs)
        held = set(runs[: max(1, round(len(runs) * fraction))])
        return [e for e in exps if e.record.run_id not in held], [e for e in exps if e.record.run_id in held]
    idx = list(range(len(exps)))
    rng.shuffle(idx)
    cut = set(idx[: max(1, round(len(exps) * fraction))]) if len(exps) > 1 else set()
    return [e for k, e in enumerate(exps) if k not in cut], [e for k, e in enumerate(exps) if k in cut]


def train_simic(urza: Urza, policy_cfg: PolicyConfig, max_adaptations: int, cfg: SimicConfig | None = None,
                *, out: str | Path | None = None) -> SimicResult:
    """Train on every boundary recorded in `urza`; writes the policy to `out` if given."""
    cfg = cfg or SimicConfig()
    exps = load_experience(urza)
    if not exps:
        raise DataError("the library's replay buffer holds no recorded boundaries: train some runs first "
                        "(`cambium morph train` records each boundary and FieldReport in library.root)")
    vocab, layouts = vocabulary(policy_cfg), layouts_of(policy_cfg)
    train_exps, val_exps = _split(exps, cfg.val_fraction, cfg.seed)
    data = [to_data(e, vocab, layouts) for e in train_exps]
    data = [d for d in data if bool(d.legal.any())]
    if not data:
        raise DataError("no recorded boundary has a seed that could legally germinate: nothing to learn from")
    torch.manual_seed(cfg.seed)
    net = TamiyoGNN(N_FEATURES, cfg.hidden, cfg.layers, len(vocab))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    rng = random.Random(cfg.seed)
    last = math.nan
    for epoch in range(cfg.epochs):
        rng.shuffle(data)
        total = 0.0
        for k in range(0, len(data), cfg.batch_graphs):
            b = Batch.from_data_list(data[k : k + cfg.batch_graphs])
            loss = _loss(net, b, cfg.beta, cfg.w_max)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * b.num_graphs
        last = total / len(data)
        if epoch % 25 == 0 or epoch == cfg.epochs - 1:
            log.info("simic epoch %d loss %.4f", epoch, last)
    net.eval()
    header: dict[str, Any] = {"hidden": cfg.hidden, "layers": cfg.layers, "vocabulary": list(vocab),
                              "simic": asdict(cfg), "objective": "awr" if cfg.beta > 0 else "bc"}
    policy = GnnPolicy(net, header, policy_cfg, max_adaptations)
    figures: dict[str, Any] = {
        "boundaries": len(exps), "train_boundaries": len(train_exps), "val_boundaries": len(val_exps),
        "runs": len({e.record.run_id for e in exps}), "final_loss": last,
        "train": evaluate(policy, train_exps), "val": evaluate(policy, val_exps) if val_exps else None,
    }
    header["figures"] = figures
    if out is not None:
        header["tensors_sha256"] = save_policy(out, net, header)
    return SimicResult(net, header, figures)
