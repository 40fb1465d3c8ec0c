"""MoE layer forward+backward: cambium's dispatch/compute/combine vs HF transformers' DeepseekV3MoE and our loop.

Shape (spec MOE-4 target): d=512, 64 routed experts top-6 + 2 shared, expert width 256, 2048 tokens, sigmoid router,
route_scale 2.5. HF's block gets our weights copied in (router, selection bias, experts, shared experts) and its
output must agree with ours to 1e-5 before anything is timed. HF experts implementations measured: "eager" (the
per-expert loop) and, when the installed transformers has it, "grouped_mm"; our other backends (grouped_mm,
segmented, padded_bmm) are timed too. HF's "batched_mm" is left out: it gathers
one weight matrix per (token, expert) row, [12288, 512, 512] fp32 ≈ 13 GB for the up projection alone at this shape.

transformers is a bench-only dependency: `.venv/bin/pip install -c constraints.txt transformers`.
Run: `python -m bench.moe_layer` (`--quick`: 16 experts top-4, 256 tokens, one round; it only checks that the
benchmark works, because HF's eager loop costs a full-size weight-gradient allocation per expert).
`python -m bench.moe_layer --backends`: our backends alone, segmented and grouped_mm against
padded_bmm, on random inputs and with a selection bias that skews the loads, to bench/results/moe_layer_backends.json.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from bench.common import interleaved_best, machine, make_record, parse_args, write_results
from cambium.nn.moe import MoE
from cambium.nn.moe_experts import resolve_backend

D, H, SHARED, SCALE = 512, 256, 2, 2.5


def build_ours(seed: int, n_experts: int, top_k: int) -> MoE:
    torch.manual_seed(seed)
    m = MoE(D, n_experts, top_k, H, n_shared_experts=SHARED, route_scale=SCALE, backend="auto")
    with torch.no_grad():
        m.router.bias.copy_(torch.randn(n_experts) * 0.01)  # a trained-looking selection bias, copied to HF too
    return m


def build_hf(ours: MoE, implementation: str) -> torch.nn.Module:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(
        hidden_size=D, n_routed_experts=ours.n_experts, num_experts_per_tok=ours.top_k, n_shared_experts=SHARED,
        moe_intermediate_size=H, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=SCALE,
        hidden_act="silu",
    )
    cfg._experts_implementation = implementation
    hf = DeepseekV3MoE(cfg)
    assert ours.shared is not None
    with torch.no_grad():
        hf.gate.weight.copy_(ours.router.weight)
        hf.gate.e_score_correction_bias.copy_(ours.router.bias)
        hf.experts.gate_up_proj.copy_(ours.w13.transpose(1, 2))  # ours [E, D, 2H] (x @ W), HF [E, 2H, D]
        hf.experts.down_proj.copy_(ours.w2.transpose(1, 2))
        hs = SHARED * H
        hf.shared_experts.gate_proj.weight.copy_(ours.shared.w13.weight[:hs])
        hf.shared_experts.up_proj.weight.copy_(ours.shared.w13.weight[hs:])
        hf.shared_experts.down_proj.weight.copy_(ours.shared.w2.weight)
    return hf


def hf_implementations() -> list[str]:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager", *(name for name in ("grouped_mm",) if name in ALL_EXPERTS_FUNCTIONS)]


def step(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        module.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_(True)
        out = module(xi)
        y = out[0] if isinstance(out, tuple) else out
        y.backward(grad)

    return run


def backends_only(args: argparse.Namespace) -> None:
    """Our expert backends alone (`--backends`): segmented and grouped_mm against padded_bmm, on random inputs and
    with a selection bias that skews the loads (as a trained model's are), written to moe_layer_backends.json."""
    n_experts, top_k = (16, 4) if args.quick else (64, 6)
    tokens = args.tokens or (256 if args.quick else 2048)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, tokens, D, generator=gen)
    grad = torch.randn(1, tokens, D, generator=gen)
    records = []
    for label, skew in (("random", 0.0), ("skewed", 0.5)):
        layers = {}
        for backend in ("padded_bmm", "segmented", "grouped_mm"):
            m = build_ours(0, n_experts, top_k)
            with torch.no_grad():
                m.router.bias.copy_(torch.linspace(0, skew, n_experts) if skew else m.router.bias)
            m.backend = backend  # type: ignore[assignment]
            layers[backend] = m
        load = layers["padded_bmm"](x)[1].load.double()
        best = interleaved_best({k: step(m, x, grad) for k, m in layers.items()}, rounds=args.rounds or 3)
        facts: dict[str, Any] = machine()
        facts.update(tokens=tokens, shape=f"d={D} E={n_experts} top{top_k}+{SHARED} shared H={H}",
                     max_over_mean_load=round(float(load.max() / load.mean()), 3), threads=torch.get_num_threads())
        for name in ("segmented", "grouped_mm"):
            rec = make_record(f"moe_layer_backends {label} {name} vs padded_bmm", "fwd+bwd seconds", best[name], "s",
                              "padded_bmm", best["padded_bmm"], higher_is_better=False, machine_facts=facts)
            records.append(rec)
            print(f"{label} (max/mean load {facts['max_over_mean_load']}): {name} {best[name]:.3f} s, padded_bmm "
                  f"{best['padded_bmm']:.3f} s, ratio {rec['ratio']:.2f}", flush=True)
    write_results("moe_layer_backends", records, args.results_dir)


def main(argv: list[str] | None = None) -> None:
    def extra(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tokens", type=int, default=None, help="tokens per batch (default 2048, --quick 512)")
        p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5, --quick 1)")
        p.add_argument("--backends", action="store_true", help="only our expert backends, random and skewed loads "
                       "(no transformers needed)")

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    if args.backends:
        backends_only(args)
        return
    tokens = args.tokens or (256 if args.quick else 2048)
    rounds = args.rounds or (1 if args.quick else 3)
    n_experts, top_k = (16, 4) if args.quick else (64, 6)
    try:
        import transformers
    except ImportError:
        hint = "bench.moe_layer needs transformers: .venv/bin/pip install -c constraints.txt transformers"
        raise SystemExit(hint) from None

    ours = build_ours(0, n_experts, top_k)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, tokens, D, generator=gen)
    grad = torch.randn(1, tokens, D, generator=gen)
    backend = resolve_backend("auto", x.device, x.dtype, (D, H, 2 * H))

    # Agreement check before timing: same outputs and input gradients as HF for every implementation.
    contenders: dict[str, Callable[[], None]] = {}
    xo = x.clone().requires_grad_(True)
    ref_out = ours(xo)[0]
    ref_out.backward(grad)
    ref_out = ref_out.detach()
    assert xo.grad is not None
    agreement: dict[str, float] = {}
    for impl in hf_implementations():
        hf = build_hf(ours, impl)
        xh = x.clone().requires_grad_(True)
        out = hf(xh)
        out.backward(grad)
        out = out.detach()
        assert xh.grad is not None
        diff = max(float((out - ref_out).abs().max()), float((xh.grad - xo.grad).abs().max()))
        agreement[impl] = diff
        if diff > 1e-5:
            raise SystemExit(f"HF {impl} disagrees with cambium by {diff:.3g} (> 1e-5): not timing")
        contenders[f"hf_{impl}"] = step(hf, x, grad)
    loop = build_ours(0, n_experts, top_k)
    loop.backend = "loop"
    contenders["cambium_loop"] = step(loop, x, grad)
    contenders[f"cambium_{backend}"] = step(ours, x, grad)
    for other in ("grouped_mm", "segmented", "padded_bmm"):
        if other != backend:
            peer = build_ours(0, n_experts, top_k)
            peer.backend = other  # type: ignore[assignment]
            contenders[f"cambium_{other}"] = step(peer, x, grad)

    best = interleaved_best(contenders, rounds=rounds, warmup=1)
    facts: dict[str, Any] = machine()
    facts.update(
        tokens=tokens, shape=f"d={D} E={n_experts} top{top_k}+{SHARED} shared H={H}",
        transformers=transformers.__version__, max_abs_diff_vs_hf=agreement, cambium_backend=backend, rounds=rounds,
    )
    ours_time = best[f"cambium_{backend}"]
    records = [
        make_record(f"moe_layer {backend} vs {name}", "fwd+bwd seconds", ours_time, "s", name, best[name],
                    higher_is_better=False, machine_facts=facts)
        for name in best
        if name != f"cambium_{backend}"
    ]
    write_results("moe_layer", records, args.results_dir)


if __name__ == "__main__":
    main()
