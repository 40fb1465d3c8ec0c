"""Strate III in the pipeline: anchors, the future model (OT-CFM in latent space + return head), its training task,
and return paths sampled at hold-out origins.

An anchor is a patch k of a segment's pretokenized grid with a full window of `seq_len` patches; its origin is the
patch's last bar e (the forecast is made at the close of e). Per anchor:

- context: the JEPA target encoder's latent z_k [D] of the window ending at k, plus two volatility features
  log(σ_P / σ_W) and log(σ_W / σ_4W), σ_n the std of the last n per-bar log returns up to e (P = patch length,
  W = `flow.vol_window`);
- latent future: z_{k+1} … z_{k+F} [F·D], each from the window ending at that patch (F = ceil(max horizon / P));
- returns: the per-bar log returns of bars e+1 … e+F·P, divided by σ_W (the return head predicts in these units).

Latents are standardised with the training anchors' mean and std (buffers of the model). The velocity net learns the
latent future given the context by OT-CFM (`cambium.worldmodel.flow`); the return head maps (context, latent future)
to a Student-t per future bar (location, scale, one learned degrees of freedom) and is trained by its negative
log-likelihood on the training anchors' true latent futures and realised returns. At a hold-out origin, N latent
futures are sampled by the ODE, each decoded into one return path (one Student-t draw per bar) and rescaled by σ_W.

Training anchors have all their future bars before the split; hold-out origins lie in the hold-out window (after the
embargo) and need `max(horizons)` realised bars after them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cambium.core.errors import DataError
from cambium.core.loop import DeviceContext, count_training_flops
from cambium.worldmodel.config import FlowConfig, ForecastConfig, TrainConfig
from cambium.worldmodel.data import Split
from cambium.worldmodel.evaluation import CodedSeries
from cambium.worldmodel.features import CandleBatch, clock_features
from cambium.worldmodel.flow import VelocityNet, cfm_pairs, sample_conditional
from cambium.worldmodel.jepa import WorldModelJEPA
from cambium.worldmodel.training import _global_mean, _PhaseTask

__all__ = [
    "N_VOL_FEATURES",
    "Anchors",
    "FlowTask",
    "FutureModel",
    "ReturnHead",
    "build_anchors",
    "future_patches",
    "holdout_origins",
    "sample_paths",
    "trailing_std",
    "train_anchors",
]

N_VOL_FEATURES = 2
_MIN_STD = 1e-6


def future_patches(horizons: Sequence[int], patch_length: int) -> int:
    """Latent future length F (patches) covering the longest horizon."""
    return math.ceil(max(horizons) / patch_length)


def trailing_std(log_returns: np.ndarray, window: int) -> np.ndarray:
    """std of r[i−window+1 … i] for every i (NaN where fewer than `window` returns exist; r[0] is NaN)."""
    r = np.nan_to_num(log_returns, nan=0.0)
    c1, c2 = np.concatenate([[0.0], np.cumsum(r)]), np.concatenate([[0.0], np.cumsum(r * r)])
    out = np.full(len(r), np.nan)
    if len(r) > window:
        s1 = c1[window + 1:] - c1[1:-window]
        s2 = c2[window + 1:] - c2[1:-window]
        var = np.maximum(s2 / window - (s1 / window) ** 2, 0.0) * window / (window - 1)
        out[window:] = np.sqrt(var)
    return out


@dataclass
class Anchors:
    """Per anchor: latent [M, D], vol features [M, 2], future latents [M, F·D] (NaN where the segment ends first),
    returns [M, F·P] (raw per-bar log returns after the origin, NaN past the segment's end), scale σ_W [M],
    segment index [M], origin bar e [M], origin bar's open time [M] (epoch ms)."""

    latent: Tensor
    vol: Tensor
    future: Tensor
    returns: Tensor
    scale: Tensor
    segment: Tensor
    end_bar: Tensor
    origin_ms: Tensor

    def __len__(self) -> int:
        return int(self.latent.shape[0])

    def select(self, keep: Tensor) -> Anchors:
        return Anchors(**{f.name: getattr(self, f.name)[keep] for f in fields(self)})


@torch.no_grad()
def build_anchors(model: WorldModelJEPA, coded: Sequence[CodedSeries], flow: FlowConfig, horizons: Sequence[int],
                  batch_windows: int = 256, from_ms: int | None = None) -> Anchors:
    """Every anchor of `coded` with a full window and 4·vol_window bars of history (see the module docstring); with
    `from_ms` only those whose origin bar opens at or after it (the encoder then runs on those windows alone)."""
    model.eval()
    seq, w = model.cfg.seq_len, flow.vol_window
    parts: list[Anchors] = []
    for si, cs in enumerate(coded):
        n, p = int(cs.codes.shape[0]), cs.patch_length
        fp = future_patches(horizons, p)
        if n < seq:
            continue
        z = torch.full((n, model.cfg.encoder.d_model), float("nan"))
        first = seq - 1
        if from_ms is not None:
            first = max(first, int((cs.series.open_time_ms[cs.end_bar(torch.arange(n))] < from_ms).sum()))
        for chunk in torch.arange(first, n).split(batch_windows):
            firsts = (chunk - (seq - 1)).tolist()
            idx = torch.stack([cs.codes[f : f + seq] for f in firsts])
            bars = [cs.window_bars(f, seq) for f in firsts]
            clock = clock_features(CandleBatch(torch.stack([b[0] for b in bars]), torch.stack([b[1] for b in bars])),
                                   p)
            z[chunk] = model.encode_codes(idx, clock.to(model.embed.weight.dtype))[:, -1].float()
        close = cs.series.ohlcv[:, 3].double().numpy()
        r = np.concatenate([[np.nan], np.diff(np.log(close))])
        s_p, s_w, s_l = (np.maximum(trailing_std(r, m), _MIN_STD) for m in (p, w, 4 * w))
        k = torch.arange(first, n)
        e = cs.end_bar(k)
        keep = e >= 4 * w
        k, e = k[keep], e[keep]
        if not len(k):
            continue
        fut = torch.full((len(k), fp, z.shape[1]), float("nan"))
        for j in range(1, fp + 1):
            ok = k + j < n
            fut[ok, j - 1] = z[k[ok] + j]
        hb = fp * p
        rp = np.concatenate([r, np.full(hb, np.nan)])
        en = e.numpy()
        rets = np.stack([rp[en + 1 + i] for i in range(hb)], axis=1)
        vol = np.stack([np.log(s_p[en] / s_w[en]), np.log(s_w[en] / s_l[en])], axis=1)
        parts.append(Anchors(z[k], torch.from_numpy(vol).float(), fut.flatten(1), torch.from_numpy(rets),
                             torch.from_numpy(s_w[en]), torch.full((len(k),), si, dtype=torch.long), e,
                             cs.series.open_time_ms[e]))
    if not parts:
        raise DataError(f"no Strate III anchor: every segment is shorter than jepa.seq_len={seq} patches plus "
                        f"4 * flow.vol_window={4 * w} bars")
    return Anchors(**{f.name: torch.cat([getattr(a, f.name) for a in parts]) for f in fields(Anchors)})


def train_anchors(anchors: Anchors, coded: Sequence[CodedSeries], split: Split) -> Anchors:
    """Anchors whose latent future and returns exist and whose last future bar lies before the split."""
    last = anchors.end_bar + anchors.returns.shape[1]
    ok = ~torch.isnan(anchors.future).any(1) & ~torch.isnan(anchors.returns).any(1)
    before = torch.zeros(len(anchors), dtype=torch.bool)
    for i in ok.nonzero().flatten().tolist():
        t = coded[int(anchors.segment[i])].series.open_time_ms
        before[i] = int(t[int(last[i])]) < split.split_ms
    return anchors.select(ok & before)


def holdout_origins(anchors: Anchors, coded: Sequence[CodedSeries], split: Split, max_horizon: int,
                    min_train_bars: int) -> Anchors:
    """Anchors whose origin bar lies in the hold-out window, with `max_horizon` realised bars after it, in segments
    with at least `min_train_bars` bars in the training window."""
    ok = (anchors.origin_ms >= split.holdout_ms) & ~torch.isnan(anchors.returns[:, :max_horizon]).any(1)
    trained = torch.tensor([int((cs.series.open_time_ms < split.split_ms).sum()) >= min_train_bars for cs in coded])
    return anchors.select(ok & trained[anchors.segment])


class ReturnHead(nn.Module):
    """(context [B, C], latent future [B, F·D]) -> Student-t per future bar: loc [B, H], scale [B, H], df (scalar)."""

    def __init__(self, cond_dim: int, future_dim: int, bars: int, hidden: int) -> None:
        super().__init__()
        self.bars = bars
        self.net = nn.Sequential(nn.Linear(cond_dim + future_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, 2 * bars))
        self.raw_df = nn.Parameter(torch.tensor(2.0))

    def forward(self, cond: Tensor, future: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        loc, raw_scale = self.net(torch.cat([cond, future], dim=-1)).chunk(2, dim=-1)
        return loc, F.softplus(raw_scale) + 1e-3, 2.0 + F.softplus(self.raw_df)

    def nll(self, cond: Tensor, future: Tensor, returns: Tensor) -> Tensor:
        """Mean Student-t negative log-likelihood of normalised returns [B, H]."""
        loc, scale, df = self(cond, future)
        return -torch.distributions.StudentT(df, loc, scale).log_prob(returns).mean()


class FutureModel(nn.Module):
    """Strate III: standardisation buffers, the velocity net over latent futures and the return head."""

    def __init__(self, cfg: FlowConfig, latent_dim: int, future_patches: int, patch_length: int) -> None:
        super().__init__()
        self.cfg, self.latent_dim, self.future_patches = cfg, latent_dim, future_patches
        cond_dim = latent_dim + N_VOL_FEATURES
        self.lat_mean: Tensor
        self.lat_std: Tensor
        self.register_buffer("lat_mean", torch.zeros(latent_dim))
        self.register_buffer("lat_std", torch.ones(latent_dim))
        self.velocity = VelocityNet(future_patches * latent_dim, cond_dim, cfg.hidden_dim, cfg.n_layers)
        self.head = ReturnHead(cond_dim, future_patches * latent_dim, future_patches * patch_length, cfg.head_hidden)

    @torch.no_grad()
    def fit_standardisation(self, latents: Tensor) -> None:
        """Mean and std per latent dimension from the training anchors' context latents [M, D]."""
        self.lat_mean.copy_(latents.mean(0))
        self.lat_std.copy_(latents.std(0).clamp_min(1e-6))

    def context(self, latent: Tensor, vol: Tensor) -> Tensor:
        """Standardised latent [B, D] ++ volatility features [B, 2] -> [B, D + 2]."""
        mean, std = self.lat_mean.to(latent.device), self.lat_std.to(latent.device)
        return torch.cat([(latent - mean) / std, vol.to(latent.device)], dim=-1)

    def standard_future(self, future: Tensor) -> Tensor:
        """Latent futures [B, F·D] -> standardised, per patch."""
        f = future.view(future.shape[0], self.future_patches, self.latent_dim)
        return ((f - self.lat_mean.to(f.device)) / self.lat_std.to(f.device)).flatten(1)

    def forward(self, xt: Tensor, t: Tensor, cond: Tensor, target: Tensor, head_cond: Tensor, future: Tensor,
                returns: Tensor) -> tuple[Tensor, Tensor]:
        """The two training losses: flow matching on (x_t, t, cond) against `target`, and the return head's NLL on
        (context, true standardised future, normalised returns)."""
        cfm = F.mse_loss(self.velocity(xt, t, cond), target)
        return cfm, self.head.nll(head_cond, future, returns)


@dataclass
class _Prepared:
    cond: Tensor  # [M, D + 2]
    future: Tensor  # [M, F·D] standardised
    returns: Tensor  # [M, H] normalised by σ_W


def _prepare(model: FutureModel, anchors: Anchors) -> _Prepared:
    with torch.no_grad():
        ret = (anchors.returns / anchors.scale[:, None]).float()
        return _Prepared(model.context(anchors.latent, anchors.vol), model.standard_future(anchors.future), ret)


class FlowTask(_PhaseTask):
    """Strate III training one step at a time (`cambium.core.loop`): batches of training anchors drawn uniformly,
    OT-CFM loss + return-head NLL, AdamW with the cosine schedule. `holdout` anchors (with futures) give `evaluate`
    the same two losses on a fixed draw. Data parallel: the global batch (noise, OT pairs, times) is drawn alike on
    every rank, and each rank takes its rows."""

    label = "worldmodel flow"

    def __init__(self, model: FutureModel, anchors: Anchors, train: TrainConfig, generator: torch.Generator, *,
                 device: DeviceContext | None = None, holdout: Anchors | None = None) -> None:
        if len(anchors) < 2:
            raise DataError(f"{len(anchors)} Strate III training anchors: need at least 2 (more data, a shorter "
                            "flow.vol_window or fewer jepa.seq_len patches)")
        super().__init__(model, train, generator, device)
        self.model: FutureModel = model
        self.data = _prepare(model, anchors)
        self.holdout = _prepare(model, holdout) if holdout is not None and len(holdout) else None
        self.events_per_step = train.batch_size

    def _losses(self, data: _Prepared, idx: Tensor, generator: torch.Generator,
                rows: slice) -> tuple[Tensor, Tensor]:
        c = self.model.cfg
        xt, t, cond, target = cfm_pairs(data.future[idx], data.cond[idx], generator, coupling=c.coupling,
                                        sigma=c.sigma, exact_max_batch=c.exact_max_batch,
                                        sinkhorn_reg=c.sinkhorn_reg, cond_weight=c.cond_weight)
        dev = self.device
        return self.forward(dev.to(xt[rows]), dev.to(t[rows]), dev.to(cond[rows]), dev.to(target[rows]),
                            dev.to(data.cond[idx][rows]), dev.to(data.future[idx][rows]),
                            dev.to(data.returns[idx][rows]))

    def flops_per_step(self) -> float:
        idx = torch.arange(min(self.train.batch_size, self.data.cond.shape[0]))
        rows = slice(None)

        def loss_of(probe: nn.Module) -> Tensor:
            saved, self.forward = self.forward, probe
            try:
                cfm, nll = self._losses(self.data, idx, torch.Generator().manual_seed(0), rows)
            finally:
                self.forward = saved
            return cfm + nll

        return count_training_flops(self.model, loss_of)

    def train_step(self, step: int) -> dict[str, float]:
        self.model.train()
        lr = self.opt.param_groups[0]["lr"]
        idx = torch.randint(self.data.cond.shape[0], (self.train.batch_size,), generator=self.generator)
        with self.device.autocast():
            cfm, nll = self._losses(self.data, idx, self.generator, self.shard)
        loss = cfm + nll
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.train.grad_clip)
        self.opt.step()
        self.sched.step(step + 1)
        df = float(2.0 + F.softplus(self.model.head.raw_df.detach()))
        return {"loss": _global_mean(loss.detach()), "cfm": _global_mean(cfm.detach()),
                "nll": _global_mean(nll.detach()), "grad_norm": float(grad_norm), "lr": float(lr), "df": df}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.holdout is None:
            return {}
        self.model.eval()
        idx = torch.arange(self.holdout.cond.shape[0])
        saved, self.forward = self.forward, self.model
        try:
            cfm, nll = self._losses(self.holdout, idx, torch.Generator().manual_seed(0), slice(None))
        finally:
            self.forward = saved
        return {"holdout_cfm": float(cfm), "holdout_nll": float(nll)}


@torch.no_grad()
def sample_paths(model: FutureModel, anchors: Anchors, cfg: ForecastConfig, generator: torch.Generator,
                 rng: np.random.Generator, device: torch.device | None = None) -> np.ndarray:
    """`cfg.n_futures` return paths per origin: [M, N, max(horizons)] float32 log returns (see the module docstring).

    Latent noise comes from `generator` (CPU), the return head's Student-t draws from `rng`."""
    model.eval()
    dev = device or torch.device("cpu")
    n, hmax = cfg.n_futures, max(cfg.horizons)
    out = np.empty((len(anchors), n, hmax), dtype=np.float32)
    for chunk in torch.arange(len(anchors)).split(cfg.batch_origins):
        cond = model.context(anchors.latent[chunk], anchors.vol[chunk]).to(dev)
        fut = sample_conditional(model.velocity, cond, n, cfg.ode_steps, cfg.sampler, generator)  # [b, n, F·D]
        loc, scale, df = model.head(cond.repeat_interleave(n, 0), fut.flatten(0, 1))
        draws = rng.standard_t(float(df), size=tuple(loc.shape))
        paths = loc.double().cpu().numpy() + scale.double().cpu().numpy() * draws
        paths = paths.reshape(len(chunk), n, -1)[:, :, :hmax] * anchors.scale[chunk].numpy()[:, None, None]
        out[chunk.numpy()] = paths.astype(np.float32)
    return out
