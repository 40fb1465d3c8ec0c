"""Throughput of the nested models at equal parameters, and the cost of CMS memory levels.

Run: `python -m bench.nested [--quick] [--threads N]`. Cases (forward + backward of one build step's model on a
`[B, T]` chunk, random tokens; the best of interleaved rounds, bench/common.py):
  * compositions: tokens/s of MAG, MAC, MAL and full attention at the `*-cpu` configs' shapes (dim 128, 4 blocks,
    4 heads, T = 128, B = 8, window / segment 32, SwiGLU widths from configs/nested/*-cpu.toml: equal parameters
    within 0.05 %), each against the SWA-only model measured in the same rounds (ratio = its tokens/s over SWA's;
    < 1 means slower than SWA).
  * cms: tokens/s of MAG with k = 1, 2, 3, 4 CMS levels (periods 1, 8, 64, 512; every level runs its memory in the
    forward pass whether or not it fires), against k = 1 (ratio < 1: the overhead of the extra levels).
Writes bench/results/nested.json and prints one line per record, ratio last.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.common import interleaved_best, machine, make_record, parse_args, write_results
from cambium.core.config import load
from cambium.nested.config import CmsConfig, NestedConfig
from cambium.nested.model import NestedLM, lm_loss

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "nested"
PERIODS = (1, 8, 64, 512)


def step_fn(model: NestedLM, tokens: torch.Tensor):  # type: ignore[no-untyped-def]
    def run() -> None:
        logits, _, _ = model(tokens[:, :-1])
        lm_loss(logits, tokens[:, 1:]).backward()
        model.zero_grad(set_to_none=True)
    return run


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], extra=lambda p: p.add_argument("--threads", type=int, default=None))
    if args.threads:
        torch.set_num_threads(args.threads)
    facts = machine()
    rounds = 2 if args.quick else 5
    seq_len, batch = (32, 2) if args.quick else (128, 8)
    tokens = torch.randint(0, 1024, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    n_tokens = batch * seq_len
    fns, params = {}, {}
    for name in ("swa", "mag", "mac", "mal", "full"):
        cfg = load(CONFIGS / f"{name}-cpu.toml", NestedConfig)
        torch.manual_seed(0)
        model = NestedLM(cfg.model, seq_len, cfg.cms if cfg.model.has_memory else None)
        params[name] = sum(p.numel() for p in model.parameters())
        fns[name] = step_fn(model, tokens)
    best = interleaved_best(fns, rounds)
    records = []
    for name in ("mag", "mac", "mal", "full"):
        records.append(make_record(f"compositions/{name} ({params[name]:,} params)", "fwd+bwd tokens/s",
                                   n_tokens / best[name], "tokens/s", f"swa ({params['swa']:,} params)",
                                   n_tokens / best["swa"], higher_is_better=True, machine_facts=facts))
    mag = load(CONFIGS / "mag-cpu.toml", NestedConfig)
    cms_fns = {}
    for k in range(1, 5):
        torch.manual_seed(0)
        model = NestedLM(mag.model, seq_len, CmsConfig(periods=PERIODS[:k]))
        cms_fns[k] = step_fn(model, tokens)
    cms_best = interleaved_best({str(k): f for k, f in cms_fns.items()}, rounds)
    for k in range(2, 5):
        records.append(make_record(f"cms/k={k}", "fwd+bwd tokens/s", n_tokens / cms_best[str(k)], "tokens/s",
                                   "k=1", n_tokens / cms_best["1"], higher_is_better=True, machine_facts=facts))
    write_results("nested", records, args.results_dir)


if __name__ == "__main__":
    main()
