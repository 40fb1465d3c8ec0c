"""Phase 8's data: per-bar observation features from the trained models, real candles and funding, for the agents'
training window and the hold-out; and the agents trained on them.

Per symbol segment, an anchor (`cambium.worldmodel.futures.build_anchors`) exists at the last bar e of every patch;
its row is known at the close of e. A bar t takes the row of the latest anchor with e ≤ t (nothing later):

    context [D + 2]     the flow's conditioning row: the standardised JEPA latent and the two volatility features
    multiverse [3]      convergence, bifurcation index, Lyapunov proxy of the anchor (WM-5), when computed
    bar [2]             the bar's log return over σ_W (the anchor's trailing volatility), and (t − e) / P

Features are standardised with the mean and std of the agents' training bars. The training window is the bars before
the split (the last `agents.train_bars` of each segment, when set), the hold-out the bars from the hold-out start on
(after the embargo); an agent never sees a hold-out bar before phase 9.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cambium.core.errors import ConfigError, DataError
from cambium.core.files import atomic_write
from cambium.market.candles import interval_ms
from cambium.worldmodel.artifacts import RunArtifacts, load_weights, verified, write_json
from cambium.worldmodel.backtest import BASELINES, UNSCALED, Policy, SegmentData, run_backtest
from cambium.worldmodel.config import WorldModelConfig
from cambium.worldmodel.data import Split
from cambium.worldmodel.env import TradingEnv, funding_per_bar, read_funding
from cambium.worldmodel.evaluation import CodedSeries
from cambium.worldmodel.futures import Anchors, FutureModel, build_anchors
from cambium.worldmodel.jepa import WorldModelJEPA
from cambium.worldmodel.multiverse import MultiverseConfig, multiverse_features
from cambium.worldmodel.ppo import PPOAgent, train_ppo
from cambium.worldmodel.report import write_backtest_report
from cambium.worldmodel.tdmpc import TDMPC2Agent, train_tdmpc

__all__ = ["AGENT_SECTIONS", "FEATURES_BAR", "AgentData", "agents_fingerprint", "backtest_phase", "build_agent_data",
           "concat_env", "funding_files", "load_holdout", "save_holdout", "train_agents"]

# The config sections read by phases 8 and 9 only (a resume may change them; the phases are then redone).
AGENT_SECTIONS = ("env", "agents", "ppo", "tdmpc", "multiverse", "backtest")
HOLDOUT_FILE = "agents/holdout.npz"
INFO_FILE = "agents/agents.json"

FEATURES_BAR = ("bar_return_over_vol", "bars_since_patch_end")
MULTIVERSE_NAMES = ("convergence", "bifurcation", "lyapunov")


def funding_files(pattern: str) -> dict[str, Path]:
    """Funding history files of `env.funding_glob` by symbol (file name before the first dot)."""
    return {Path(p).name.split(".")[0].upper(): Path(p) for p in sorted(glob.glob(pattern))} if pattern else {}


class AgentData:
    """Training and hold-out segments with their features (module docstring), and what was built."""

    def __init__(self, train: list[SegmentData], holdout: list[SegmentData], names: list[str],
                 info: dict[str, Any]) -> None:
        self.train, self.holdout, self.feature_names, self.info = train, holdout, names, info


def _multiverse(cfg: WorldModelConfig, model: FutureModel, contexts: torch.Tensor, seed: int) -> np.ndarray:
    mcfg: MultiverseConfig = cfg.multiverse
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        feats = multiverse_features(model.velocity, contexts, mcfg, generator=gen, latent_dims=model.latent_dim)
    return feats.stack().astype(np.float64)


def build_agent_data(cfg: WorldModelConfig, jepa: WorldModelJEPA, flow: FutureModel, coded: Sequence[CodedSeries],
                     split: Split, seed: int) -> AgentData:
    """The agents' segments (module docstring); `seed` drives the Multiverse noise."""
    step = interval_ms(cfg.data.interval)
    p = cfg.tokenizer.patch_length
    ac = cfg.agents
    from_ms = None if ac.train_bars is None else split.split_ms - ac.train_bars * step
    anchors: Anchors = build_anchors(jepa, coded, cfg.flow, cfg.forecast.horizons, cfg.evaluation.batch_windows,
                                     from_ms=from_ms)
    with torch.no_grad():
        contexts = flow.context(anchors.latent, anchors.vol)
    use_mv = ac.scaling != "none" or ac.multiverse_features
    mv = _multiverse(cfg, flow, contexts, seed) if use_mv else None
    rows = contexts.double().numpy()
    if ac.multiverse_features:
        assert mv is not None
        rows = np.concatenate([rows, mv], axis=1)
    names = [f"latent_{i}" for i in range(flow.latent_dim)] + ["vol_patch", "vol_long"]
    names += list(MULTIVERSE_NAMES) if ac.multiverse_features else []
    names += list(FEATURES_BAR)
    files = funding_files(cfg.env.funding_glob)
    train: list[SegmentData] = []
    hold: list[SegmentData] = []
    missing: dict[str, int] = {}
    for si, cs in enumerate(coded):
        s = cs.series
        mine = (anchors.segment == si).numpy()
        if not mine.any():
            continue
        e = anchors.end_bar.numpy()[mine]
        origin = anchors.origin_ms.numpy()[mine]
        scale = anchors.scale.numpy()[mine]
        seg_rows = rows[mine]
        conv = mv[mine, 0] if (mv is not None and ac.scaling != "none") else np.ones(int(mine.sum()))
        ohlcv = s.ohlcv.double().numpy()
        t_ms = s.open_time_ms.numpy()
        symbol = s.name.split(".")[0].upper()
        if symbol in files:
            times, rates = read_funding(files[symbol])
        else:
            times, rates = None, None
        funding, covered = funding_per_bar(t_ms, step, times, rates)
        close = ohlcv[:, 3]
        r = np.concatenate([[0.0], np.diff(np.log(close))])
        for part, keep, out in (("train", origin < split.split_ms, train),
                                ("holdout", origin >= split.holdout_ms, hold)):
            if keep.sum() == 0:
                continue
            first = int(e[keep][0])
            last = int((t_ms < split.split_ms).sum()) - 1 if part == "train" else len(t_ms) - 1
            if last - first < 1:
                continue
            bars = np.arange(first, last + 1)
            ek, idx = e[keep], np.flatnonzero(keep)
            j = idx[np.searchsorted(ek, bars, side="right") - 1]  # the latest anchor at or before each bar
            bar_feats = np.stack([r[bars] / scale[j], (bars - e[j]) / p], axis=1)
            feats = np.concatenate([seg_rows[j], bar_feats], axis=1)
            gap = int((~covered[bars]).sum())
            if gap:
                if cfg.env.missing_funding == "refuse":
                    raise DataError(f"{s.name}: {gap} {part} bars lie outside the funding history of "
                                    f"{cfg.env.funding_glob!r}; add the history or set env.missing_funding = \"zero\"")
                missing[f"{s.name}/{part}"] = gap
            out.append(SegmentData(s.name, ohlcv[bars, :4].copy(), funding[bars].copy(), feats,
                                   t_ms[bars].copy(), conv[j].copy()))
    if not train or not hold:
        raise DataError(f"phase 8 found {len(train)} training and {len(hold)} hold-out segments with anchors; "
                        "need at least one of each (more data or a smaller jepa.seq_len / flow.vol_window)")
    if ac.scaling == "convergence_rank":
        reference = np.sort(np.concatenate([d.convergence for d in train]))
        for d in (*train, *hold):
            d.convergence = np.searchsorted(reference, d.convergence, side="right") / len(reference)
    for d in (*train, *hold):
        d.convergence = np.clip(d.convergence, 0.0, 1.0)
    stacked = np.concatenate([d.features for d in train])
    mean, std = stacked.mean(0), stacked.std(0)
    std = np.where(std > 1e-8, std, 1.0)
    for d in (*train, *hold):
        d.features = ((d.features - mean) / std).astype(np.float32)
    info = {"feature_names": names, "feature_mean": mean.tolist(), "feature_std": std.tolist(),
            "train_bars": sum(len(d) for d in train), "holdout_bars": sum(len(d) for d in hold),
            "funding_missing_bars": missing, "funding_symbols": sorted(files),
            "anchors": len(anchors), "multiverse": use_mv}
    return AgentData(train, hold, names, info)


def concat_env(segments: Sequence[SegmentData], cfg: WorldModelConfig) -> TradingEnv:
    """One environment over `segments` (an episode never crosses from one to the next)."""
    if not segments:
        raise ConfigError("no segment to build an environment on")
    return TradingEnv(np.concatenate([d.ohlc for d in segments]), np.concatenate([d.funding for d in segments]),
                      np.concatenate([d.features for d in segments]), cfg.env,
                      segment_lengths=[len(d) for d in segments])


def agents_fingerprint(cfg: WorldModelConfig) -> str:
    """sha256 of the AGENT_SECTIONS of `cfg` (those it has)."""
    dump = cfg.model_dump(mode="json")
    data = {k: dump[k] for k in AGENT_SECTIONS if k in dump}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


_FIELDS = ("ohlc", "funding", "features", "open_time_ms", "convergence")


def save_holdout(path: Path, segments: Sequence[SegmentData]) -> None:
    """The hold-out segments as one .npz (arrays only, no pickle), written atomically."""
    arrays = {f"{k}_{f}": getattr(d, f) for k, d in enumerate(segments) for f in _FIELDS}

    def write(tmp: Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        tmp.write_bytes(buf.getvalue())

    atomic_write(path, write)


def load_holdout(run_dir: Path) -> tuple[list[SegmentData], dict[str, Any]]:
    """Phase 8's hold-out segments and its agents.json (both checked against their recorded sha256)."""
    info = json.loads(verified(run_dir, INFO_FILE).read_text(encoding="utf-8"))
    try:
        with np.load(verified(run_dir, HOLDOUT_FILE), allow_pickle=False) as z:
            segs = [SegmentData(name, *(z[f"{k}_{f}"] for f in _FIELDS)) for k, name in enumerate(info["holdout"])]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{run_dir / HOLDOUT_FILE}: unreadable ({exc}); redo phase 8 with --start-phase 8") from None
    return segs, info


def _save_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, str(tmp)))


def _tdmpc_tensors(agent: TDMPC2Agent) -> dict[str, torch.Tensor]:
    """TD-MPC2's state dict as tensors only (safetensors): the model's under `model.`, the rest as 0-d tensors."""
    state = agent.state_dict()
    out = {f"model.{k}": v.detach().cpu() for k, v in state["model"].items()}
    out["value_scale"] = state["value_scale"].detach().cpu().reshape(())
    for k in ("obs_dim", "action_dim", "seed"):
        out[k] = torch.tensor(int(state[k]))
    return out


def train_agents(pipe: RunArtifacts, split: Split, seed: int) -> dict[str, float]:
    """Phase 8: build the agents' data, train every agent of `agents.kinds` on the training window, save the
    hold-out data and the agents' weights under <run>/agents/. -> the phase's metric values."""
    cfg = pipe.cfg
    data = build_agent_data(cfg, pipe.load_jepa(), pipe.load_flow(), pipe.coded(), split, seed + 1)
    out = pipe.run_dir / "agents"
    out.mkdir(exist_ok=True)
    values: dict[str, float] = {"agents/train_bars": data.info["train_bars"],
                                "agents/holdout_bars": data.info["holdout_bars"],
                                "agents/features": len(data.feature_names),
                                "agents/funding_missing_bars": sum(data.info["funding_missing_bars"].values())}
    env_steps = 0
    for kind in cfg.agents.kinds:
        if kind == "ppo":
            agent, figures = train_ppo(lambda: concat_env(data.train, cfg), cfg.ppo, seed=seed)
            _save_state(out / "ppo.safetensors", agent.state_dict())
            values["agents/ppo/rollout_reward_mean"] = figures["rollout_reward_mean"]
            env_steps += figures["steps"]
        else:
            env = concat_env(data.train, cfg)
            env.reset(seed=seed + 2)
            td = train_tdmpc(env, cfg.tdmpc, seed=seed + 2, steps=cfg.agents.tdmpc_steps)
            _save_state(out / "tdmpc.safetensors", _tdmpc_tensors(td))
            env_steps += cfg.agents.tdmpc_steps
    values["agents/env_steps"] = env_steps
    save_holdout(pipe.run_dir / HOLDOUT_FILE, data.holdout)
    write_json(pipe.run_dir / INFO_FILE, {**data.info, "holdout": [d.name for d in data.holdout],
                                          "kinds": list(cfg.agents.kinds)})
    return values


def load_agents(pipe: RunArtifacts, env: TradingEnv) -> dict[str, Policy]:
    """The agents phase 8 trained, by kind, for environments shaped like `env`."""
    cfg = pipe.cfg
    agents: dict[str, Policy] = {}
    for kind in cfg.agents.kinds:
        if kind == "ppo":
            state = load_weights(verified(pipe.run_dir, "agents/ppo.safetensors"))
            agents["ppo"] = PPOAgent.from_state_dict(state, env, cfg.ppo)
        else:
            state = load_weights(verified(pipe.run_dir, "agents/tdmpc.safetensors"))
            td = TDMPC2Agent(cfg.tdmpc, env.n_features + 1, 1)
            td.load_state_dict({"model": {k[6:]: v for k, v in state.items() if k.startswith("model.")},
                                "value_scale": state["value_scale"], "obs_dim": int(state["obs_dim"]),
                                "action_dim": int(state["action_dim"]), "seed": int(state["seed"])})
            agents["tdmpc"] = td
    return agents


def backtest_phase(pipe: RunArtifacts, seed: int) -> dict[str, float]:
    """Phase 9: the hold-out backtest of phase 8's agents against the baselines → report/backtest.json, the report's
    agent section and its figures. -> the phase's metric values."""
    cfg = pipe.cfg
    holdout, info = load_holdout(pipe.run_dir)
    agents = load_agents(pipe, concat_env(holdout, cfg))
    bars_per_year = 365 * 24 * 3_600_000 / interval_ms(cfg.data.interval)
    result = run_backtest(holdout, agents, cfg.env, cfg.backtest, bars_per_year, np.random.default_rng(seed),
                          scaling=cfg.agents.scaling != "none")
    result.figures["funding_missing_bars"] = info["funding_missing_bars"]
    write_json(pipe.run_dir / "report" / "backtest.json", result.figures)
    write_backtest_report(pipe, result)
    values: dict[str, float] = {"backtest/portfolio_bars": result.figures["portfolio_bars"]}
    for name, f in result.figures["policies"].items():
        key = name.replace(UNSCALED, "_unscaled")
        for m in ("sharpe", "sortino", "max_drawdown", "turnover"):
            values[f"backtest/{key}/{m}"] = f[m]
        values[f"backtest/{key}/corr_buy_and_hold"] = f["bias"]["corr"]
    for name, ci in result.figures["bootstrap"]["sharpe"].items():
        key = name.replace(UNSCALED, "_unscaled")
        values[f"backtest/{key}/sharpe_low"] = ci["low"]
        values[f"backtest/{key}/sharpe_high"] = ci["high"]
    assert set(BASELINES) <= set(result.figures["policies"])
    return values
