"""Sampling from a trained MoE run (MOE-12): the run's config, its latest checkpoint and its mixture's tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from cambium.core.checkpoint import latest_checkpoint, load_checkpoint
from cambium.core.config import load
from cambium.core.errors import CheckpointError, DataError
from cambium.core.runs import get_run
from cambium.data.mixture import load_tokenizer
from cambium.moe.config import MoEConfig
from cambium.moe.model import MoETransformer
from cambium.moe.parallel import load_sharded_state


def load_trained(runs_root: Path, run: str) -> tuple[MoEConfig, MoETransformer, int]:
    """The config, the model with its latest checkpoint's weights, and that checkpoint's step."""
    record = get_run(runs_root, run)
    cfg = load(record.dir / "config.toml", MoEConfig)
    path = latest_checkpoint(record.dir / "checkpoints")
    if path is None:
        raise CheckpointError(f"run {record.id} has no checkpoint yet; train it first")
    model = MoETransformer(cfg.model)
    ckpt = load_checkpoint(path)
    if "model" in ckpt.states:  # written before sharded checkpoints
        model.load_state_dict(ckpt.states["model"])
    else:
        load_sharded_state(path / "shards", model)
    model.eval()
    return cfg, model, ckpt.step


@torch.no_grad()
def generate(model: MoETransformer, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.8,
             top_k: int | None = 50, seed: int = 0) -> list[int]:
    """Autoregressive sampling (full recompute per token; fine for the small models this runs on CPU)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    for _ in range(max_new_tokens):
        context = ids[:, -model.cfg.max_seq_len :]
        logits = model(context).logits[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return ids[0, len(prompt_ids) :].tolist()


def sample_text(runs_root: Path, run: str, prompt: str, max_new_tokens: int = 200, *, temperature: float = 0.8,
                top_k: int | None = 50, seed: int = 0) -> str:
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # argv bytes that are not UTF-8 arrive as lone surrogates
        bad = prompt[exc.start]
        what = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"character {bad!a}"
        raise DataError(f"--prompt is not UTF-8 text ({what} at character {exc.start}); pass the prompt as "
                        "UTF-8") from None
    cfg, model, _ = load_trained(runs_root, run)
    tok = load_tokenizer(cfg.data.mixture.out_dir, ranks_file=cfg.data.mixture.tokenizer.ranks_file)
    ids = generate(model, tok.encode(prompt) or [tok.eot_id], max_new_tokens, temperature=temperature, top_k=top_k,
                   seed=seed)
    return tok.decode(ids)
