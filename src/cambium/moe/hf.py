"""Hugging Face interchange (MOE-13): our MoETransformer to and from transformers' `DeepseekV3ForCausalLM` (the
architecture of DeepSeek-V3 and Moonlight): config and weights, written and read as safetensors by transformers'
`save_pretrained` / `from_pretrained` (local files only).

The two models compute the same function; the mapping is a renaming plus three layout changes:
- SwiGLU: our fused `w13` `[2H, D]` (gate rows, then up rows) is HF's `gate_proj` and `up_proj`; routed experts are
  `[E, D, 2H]` / `[E, H, D]` for `x @ W` here and `[E, 2H, D]` / `[E, D, H]` (nn.Linear layout) in HF;
- RoPE: HF's DeepSeek rotates interleaved pairs (x[2i], x[2i+1]) (`rope_interleave=True`, as the released weights
  are laid out); we rotate the half-split pairs (x[i], x[i + P/2]). The rows of the RoPE part of the query and of
  the shared RoPE key are permuted accordingly (a consistent permutation of q and k leaves q·k unchanged);
- the aux-loss-free selection bias is HF's `e_score_correction_bias`.

What DeepseekV3 cannot express is refused with the reason: GQA attention, a sliding window, softmax router scores,
rope scaling (YaRN) on import, attention biases, an activation other than SiLU, un-normalised top-k weights.
HF's MLA normalises its q/kv latents with eps 1e-6 whatever `rms_norm_eps` says; ours use `model.norm_eps`: a model
with another eps still imports, equal to within that eps' effect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from cambium.core.errors import ConfigError, DataError
from cambium.core.progress import get_logger
from cambium.moe.config import AttentionConfig, ModelConfig, MoEConfig, MoELayerConfig
from cambium.moe.model import MoETransformer

__all__ = ["architecture_mismatch", "from_hf_config", "from_hf_state", "import_config", "load_hf", "save_hf",
           "to_hf_config", "to_hf_state"]

log = get_logger("cambium.moe.hf")


def require_transformers() -> None:
    """A ConfigError naming the install command when transformers (an optional dependency) is missing."""
    try:
        import transformers  # noqa: F401
    except ModuleNotFoundError:
        raise ConfigError("Hugging Face import/export needs the transformers package: "
                          "pip install -c constraints.txt -e '.[hf]'") from None


def _rope_perm(p: int) -> torch.Tensor:
    """ours[j] = hf[perm[j]]: half-split pair (i, i + P/2) is HF's interleaved pair (2i, 2i + 1)."""
    return torch.cat((torch.arange(0, p, 2), torch.arange(1, p, 2)))


def to_hf_config(cfg: ModelConfig) -> Any:
    """The `DeepseekV3Config` of `cfg` (ConfigError for what DeepseekV3 cannot express)."""
    require_transformers()
    from transformers import DeepseekV3Config

    a, m = cfg.attention, cfg.moe
    if a.kind != "mla":
        raise ConfigError(f"model.attention.kind={a.kind!r}: DeepseekV3 has only MLA attention; export needs 'mla'")
    if a.window is not None:
        raise ConfigError(f"model.attention.window={a.window}: DeepseekV3 has no sliding window; export needs None")
    if m is not None and m.score_func != "sigmoid":
        raise ConfigError(f"model.moe.score_func={m.score_func!r}: DeepseekV3 routes with sigmoid scores")
    moe: dict[str, Any] = {}
    if m is not None:
        moe = {"n_routed_experts": m.n_routed_experts, "n_shared_experts": m.n_shared_experts,
               "num_experts_per_tok": m.top_k, "moe_intermediate_size": m.expert_hidden,
               "routed_scaling_factor": m.route_scale, "n_group": m.n_groups, "topk_group": m.topk_groups}
    return DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.dense_hidden,
        num_hidden_layers=cfg.n_layers, first_k_dense_replace=cfg.n_dense_layers,
        num_attention_heads=a.n_heads, num_key_value_heads=a.n_heads, q_lora_rank=a.q_lora_rank,
        kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim,
        v_head_dim=a.v_head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
        norm_topk_prob=True, attention_bias=False, rope_interleave=True,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta}, **moe,
    )


def from_hf_config(hf: Any) -> ModelConfig:
    """Our ModelConfig of a `DeepseekV3Config` (ConfigError naming the HF field we cannot follow)."""
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    checks = [
        (rope.get("rope_type", "default") == "default", f"rope_parameters.rope_type={rope.get('rope_type')!r} "
         "(rope scaling such as YaRN is not implemented here)"),
        (not getattr(hf, "attention_bias", False), "attention_bias=True (our projections have no bias)"),
        (hf.hidden_act == "silu", f"hidden_act={hf.hidden_act!r} (our SwiGLU uses silu)"),
        (getattr(hf, "norm_topk_prob", True), "norm_topk_prob=False (our router always renormalises over top-k)"),
        (hf.num_key_value_heads == hf.num_attention_heads,
         f"num_key_value_heads={hf.num_key_value_heads} != num_attention_heads={hf.num_attention_heads}"),
    ]
    for ok, what in checks:
        if not ok:
            raise ConfigError(f"Hugging Face config: {what}; this checkpoint cannot be imported")
    try:
        dense = min(hf.first_k_dense_replace, hf.num_hidden_layers)
    except TypeError:
        raise ConfigError(f"Hugging Face config: first_k_dense_replace={hf.first_k_dense_replace!r} / "
                          f"num_hidden_layers={hf.num_hidden_layers!r} are not layer counts") from None
    try:
        return _model_config(hf, rope, dense)
    except (ValidationError, TypeError, ValueError) as exc:
        first = str(exc).splitlines()
        raise ConfigError(f"Hugging Face config does not make a valid model: {' '.join(first[:3])}") from None


def _model_config(hf: Any, rope: dict[str, Any], dense: int) -> ModelConfig:
    moe = None
    if dense < hf.num_hidden_layers:
        moe = MoELayerConfig(n_routed_experts=hf.n_routed_experts, n_shared_experts=hf.n_shared_experts or 0,
                             top_k=hf.num_experts_per_tok, expert_hidden=hf.moe_intermediate_size,
                             score_func="sigmoid", route_scale=hf.routed_scaling_factor, n_groups=hf.n_group or 1,
                             topk_groups=hf.topk_group or 1)
    if hf.rms_norm_eps != 1e-6:
        log.warning("rms_norm_eps=%g: HF's MLA latent norms use 1e-6, ours will use %g", hf.rms_norm_eps,
                    hf.rms_norm_eps)
    return ModelConfig(
        vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers, n_dense_layers=dense,
        dense_hidden=hf.intermediate_size, max_seq_len=hf.max_position_embeddings,
        tie_embeddings=bool(hf.tie_word_embeddings), norm_eps=hf.rms_norm_eps, init_std=hf.initializer_range,
        attention=AttentionConfig(kind="mla", n_heads=hf.num_attention_heads, q_lora_rank=hf.q_lora_rank,
                                  kv_lora_rank=hf.kv_lora_rank, qk_nope_head_dim=hf.qk_nope_head_dim,
                                  qk_rope_head_dim=hf.qk_rope_head_dim, v_head_dim=hf.v_head_dim,
                                  rope_theta=float(rope.get("rope_theta", 10000.0))),
        moe=moe,
    )


def _rope_rows(w: torch.Tensor, heads: int, nope: int, p: int, index: torch.Tensor) -> torch.Tensor:
    """Permute the RoPE rows of a per-head projection `[heads·(nope + P), in]`."""
    w = w.view(heads, nope + p, -1)
    return torch.cat((w[:, :nope], w[:, nope:][:, index]), dim=1).reshape(heads * (nope + p), -1)


def _latent_rows(w: torch.Tensor, rank: int, index: torch.Tensor) -> torch.Tensor:
    """Permute the RoPE rows of `kv_a_proj_with_mqa` `[rank + P, in]` (the last P rows)."""
    return torch.cat((w[:rank], w[rank:][index]))


def _layer_names(cfg: ModelConfig, i: int) -> dict[str, str]:
    """Our parameter name (within block i) → HF's (within model.layers.i), for the one-to-one renames."""
    names = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
             "attn.wq_a.weight": "self_attn.q_a_proj.weight", "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
             "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
             "attn.wkv_b.weight": "self_attn.kv_b_proj.weight", "attn.wo.weight": "self_attn.o_proj.weight"}
    if i < cfg.n_dense_layers:
        names["ffn.w2.weight"] = "mlp.down_proj.weight"
    else:
        names.update({"ffn.router.weight": "mlp.gate.weight", "ffn.router.bias": "mlp.gate.e_score_correction_bias",
                      "ffn.shared.w2.weight": "mlp.shared_experts.down_proj.weight"})
    return names


def to_hf_state(model: MoETransformer) -> dict[str, torch.Tensor]:
    """Our state dict in `DeepseekV3ForCausalLM`'s names and layouts."""
    cfg, a = model.cfg, model.cfg.attention
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    inverse = torch.argsort(_rope_perm(a.qk_rope_head_dim))  # hf = ours[inverse]
    out = {"model.embed_tokens.weight": ours["embed.weight"], "model.norm.weight": ours["norm.weight"]}
    out["lm_head.weight"] = ours["embed.weight" if cfg.tie_embeddings else "lm_head.weight"]
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        for ours_name, hf_name in _layer_names(cfg, i).items():
            if src + ours_name in ours:
                out[dst + hf_name] = ours[src + ours_name]
        for q in ("wq", "wq_b"):
            if f"{src}attn.{q}.weight" in ours:
                out[f"{dst}self_attn.{'q_proj' if q == 'wq' else 'q_b_proj'}.weight"] = _rope_rows(
                    ours[f"{src}attn.{q}.weight"], a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, inverse)
        out[f"{dst}self_attn.kv_a_proj_with_mqa.weight"] = _latent_rows(ours[f"{src}attn.wkv_a.weight"],
                                                                        a.kv_lora_rank, inverse)
        if i < cfg.n_dense_layers:
            gate, up = ours[f"{src}ffn.w13.weight"].chunk(2)
            out[f"{dst}mlp.gate_proj.weight"], out[f"{dst}mlp.up_proj.weight"] = gate, up
        else:
            out[f"{dst}mlp.experts.gate_up_proj"] = ours[f"{src}ffn.w13"].transpose(1, 2)
            out[f"{dst}mlp.experts.down_proj"] = ours[f"{src}ffn.w2"].transpose(1, 2)
            if f"{src}ffn.shared.w13.weight" in ours:
                gate, up = ours[f"{src}ffn.shared.w13.weight"].chunk(2)
                out[f"{dst}mlp.shared_experts.gate_proj.weight"] = gate
                out[f"{dst}mlp.shared_experts.up_proj.weight"] = up
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `DeepseekV3ForCausalLM` state dict in our names and layouts (for `MoETransformer(cfg)`); a missing tensor
    is a DataError naming it."""
    a = cfg.attention
    perm = _rope_perm(a.qk_rope_head_dim)

    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise DataError(f"Hugging Face checkpoint: tensor {name!r} is missing")
        return hf[name].detach().float()

    out = {"embed.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = get("lm_head.weight")
    shared = cfg.moe is not None and cfg.moe.n_shared_experts > 0
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        for ours_name, hf_name in _layer_names(cfg, i).items():
            if ours_name.startswith(("attn.wq_a", "attn.q_norm")) and a.q_lora_rank is None:
                continue
            if ours_name.startswith("ffn.shared") and not shared:
                continue
            out[dst + ours_name] = get(src + hf_name)
        if a.q_lora_rank is None:
            out[f"{dst}attn.wq.weight"] = _rope_rows(get(f"{src}self_attn.q_proj.weight"), a.n_heads,
                                                     a.qk_nope_head_dim, a.qk_rope_head_dim, perm)
        else:
            out[f"{dst}attn.wq_b.weight"] = _rope_rows(get(f"{src}self_attn.q_b_proj.weight"), a.n_heads,
                                                       a.qk_nope_head_dim, a.qk_rope_head_dim, perm)
        out[f"{dst}attn.wkv_a.weight"] = _latent_rows(get(f"{src}self_attn.kv_a_proj_with_mqa.weight"),
                                                      a.kv_lora_rank, perm)
        if i < cfg.n_dense_layers:
            out[f"{dst}ffn.w13.weight"] = torch.cat((get(f"{src}mlp.gate_proj.weight"),
                                                     get(f"{src}mlp.up_proj.weight")))
        else:
            out[f"{dst}ffn.w13"] = get(f"{src}mlp.experts.gate_up_proj").transpose(1, 2).contiguous()
            out[f"{dst}ffn.w2"] = get(f"{src}mlp.experts.down_proj").transpose(1, 2).contiguous()
            if shared:
                out[f"{dst}ffn.shared.w13.weight"] = torch.cat((get(f"{src}mlp.shared_experts.gate_proj.weight"),
                                                                get(f"{src}mlp.shared_experts.up_proj.weight")))
    return out


def save_hf(model: MoETransformer, out_dir: Path) -> Path:
    """Write `model` as a `DeepseekV3ForCausalLM` directory (config.json + safetensors) under `out_dir`."""
    require_transformers()
    from transformers import DeepseekV3ForCausalLM

    config = to_hf_config(model.cfg)
    with torch.device("meta"):
        hf = DeepseekV3ForCausalLM(config)
    hf.load_state_dict(to_hf_state(model), strict=True, assign=True)
    if model.cfg.tie_embeddings:
        hf.tie_weights()
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def _read_config(path: Path) -> tuple[Any, ModelConfig]:
    """The DeepseekV3Config in `path`/config.json and our ModelConfig of it (DataError / ConfigError otherwise)."""
    require_transformers()
    from transformers import DeepseekV3Config

    from cambium.core.errors import CambiumError

    if not (path / "config.json").is_file():
        raise DataError(f"{path}: no config.json; give a directory written by transformers' save_pretrained")
    try:
        hf_cfg = DeepseekV3Config.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers validates with its own (and huggingface_hub's) exception types
        raise DataError(f"{path}/config.json is not a DeepseekV3 config: {_first_line(exc)}") from None
    if getattr(hf_cfg, "model_type", None) != "deepseek_v3":
        raise DataError(f"{path}: model_type={getattr(hf_cfg, 'model_type', None)!r}, not 'deepseek_v3'")
    try:
        return hf_cfg, from_hf_config(hf_cfg)
    except CambiumError:
        raise
    except Exception as exc:  # a field of an unexpected type somewhere in the mapping
        raise ConfigError(f"{path}/config.json cannot be imported: {_first_line(exc)}") from None


def load_hf(path: Path) -> MoETransformer:
    """Our model (config and weights) of a `DeepseekV3ForCausalLM` directory saved by transformers."""
    from transformers import DeepseekV3ForCausalLM

    hf_cfg, cfg = _read_config(path)
    try:
        hf = DeepseekV3ForCausalLM.from_pretrained(path, config=hf_cfg, local_files_only=True, dtype=torch.float32)
    except Exception as exc:  # a damaged file meets many layers (safetensors, torch, transformers), each its own type
        raise DataError(f"{path}: the weights cannot be loaded: {_first_line(exc)}") from None
    model = MoETransformer(cfg)
    model.load_state_dict(from_hf_state(cfg, hf.state_dict()), strict=True)
    return model


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def architecture_mismatch(ours: ModelConfig, imported: ModelConfig) -> list[str]:
    """The architecture fields (those a DeepseekV3 config sets) where `ours` differs from `imported`, as
    'model.<key>=<ours> (checkpoint: <theirs>)'."""
    theirs = _flatten(imported.model_dump(mode="json", exclude_unset=True))
    mine = _flatten(ours.model_dump(mode="json"))
    if (ours.moe is None) != (imported.moe is None):
        return [f"model.moe is {'absent' if ours.moe is None else 'present'} (checkpoint: "
                f"{'absent' if imported.moe is None else 'present'})"]
    return [f"model.{k}={mine.get(k)!r} (checkpoint: {v!r})" for k, v in theirs.items() if mine.get(k) != v]


def import_config(base: MoEConfig, path: Path) -> MoEConfig:
    """`base` with the architecture of the DeepseekV3 checkpoint at `path` and `train.init_from_hf=path`: a config
    that trains from those weights (data, optimiser, schedule and the router's training settings stay `base`'s)."""
    from cambium.core.config import load_data

    _, imported = _read_config(path)
    data = base.model_dump(mode="json")
    arch = imported.model_dump(mode="json", exclude_unset=True)
    if imported.moe is None:
        data["model"].pop("moe", None)
    elif data["model"].get("moe") is None:
        data["model"]["moe"] = {}
    for key, value in arch.items():
        if isinstance(value, dict):
            data["model"][key] = {**(data["model"].get(key) or {}), **value}
        else:
            data["model"][key] = value
    data["name"] = f"{base.name}-hf"
    data["train"]["init_from_hf"] = str(path)
    return load_data(data, type(base))
