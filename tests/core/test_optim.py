"""Optimizers: groups, Muon against a reference written from the definition, AdamW against torch.optim.AdamW."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from cambium.core.config import ConfigModel, load_data
from cambium.core.errors import CheckpointError, ConfigError
from cambium.core.optim import (
    NS_COEFFICIENTS,
    Muon,
    MuonWithAdamW,
    ParamGroupSpec,
    assign_param_groups,
    build_optimizer,
    muon_update_scale,
    newton_schulz,
)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3)
        self.attn_q = torch.nn.Linear(12, 8, bias=False)
        self.mlp = torch.nn.Linear(8, 20)
        self.head = torch.nn.Linear(20, 3)
        self.norm = torch.nn.LayerNorm(12)

    def forward(self, img: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        pooled = self.conv(img).mean(dim=(-2, -1)).sum(-1, keepdim=True)
        return self.head(torch.tanh(self.mlp(self.attn_q(self.norm(x))))) + pooled


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(5, 2, 6, 6, generator=gen), torch.randn(5, 12, generator=gen)


def loss_of(net: Net, step: int) -> torch.Tensor:
    img, x = batch(step)
    return (net(img, x) ** 2).mean()


MIXED_SPECS = [
    ParamGroupSpec(name="matrices", ndims=(2,), exclude=("head.*",), optimizer="muon", lr=0.02, weight_decay=0.1),
    ParamGroupSpec(name="conv", patterns=("conv.weight",), optimizer="muon", lr=0.01, flatten_conv=True,
                   update_scale="moonlight", nesterov=False),
    ParamGroupSpec(name="head", patterns=("head.*",), lr=3e-3, weight_decay=0.05),
    ParamGroupSpec(name="vectors", ndims=(1,), exclude=("head.*",), lr=1e-3, betas=(0.8, 0.99)),
]


def train(opt: MuonWithAdamW | torch.optim.Optimizer, net: Net, steps: range) -> list[float]:
    losses = []
    for step in steps:
        opt.zero_grad()
        loss = loss_of(net, step)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ---- groups


def test_groups_take_every_parameter_once() -> None:
    net = make_net()
    groups = assign_param_groups(net.named_parameters(), MIXED_SPECS)
    got = {spec.name: [n for n, _ in named] for spec, named in groups}
    assert got == {
        "matrices": ["attn_q.weight", "mlp.weight"],
        "conv": ["conv.weight"],
        "head": ["head.weight", "head.bias"],
        "vectors": ["conv.bias", "mlp.bias", "norm.weight", "norm.bias"],
    }


def test_param_in_two_groups_is_rejected() -> None:
    specs = [ParamGroupSpec(name="all", lr=1e-3), ParamGroupSpec(name="head", patterns=("head.*",), lr=1e-3)]
    with pytest.raises(ConfigError, match=r"'head.weight'.*matched by groups \['all', 'head'\]"):
        assign_param_groups(make_net().named_parameters(), specs)


def test_param_in_no_group_is_rejected() -> None:
    specs = [ParamGroupSpec(name="mats", ndims=(2, 4), lr=1e-3)]
    with pytest.raises(ConfigError, match=r"matched by no group.*'conv.bias'"):
        assign_param_groups(make_net().named_parameters(), specs)


def test_predicates_and_frozen_params() -> None:
    net = make_net()
    net.norm.requires_grad_(False)
    specs = [ParamGroupSpec(name="big", lr=1e-3), ParamGroupSpec(name="small", lr=1e-3)]
    preds = {"big": lambda n, p: p.numel() >= 64, "small": lambda n, p: p.numel() < 64}
    groups = assign_param_groups(net.named_parameters(), specs, preds)
    got = {spec.name: [n for n, _ in named] for spec, named in groups}
    assert got == {"big": ["conv.weight", "attn_q.weight", "mlp.weight"],
                   "small": ["conv.bias", "mlp.bias", "head.weight", "head.bias"]}
    with pytest.raises(ConfigError, match="unknown groups"):
        assign_param_groups(net.named_parameters(), specs, {"nope": lambda n, p: True})


def test_group_errors() -> None:
    net = make_net()
    with pytest.raises(ConfigError, match=r"'norm.weight' has shape \[12\]; Muon takes 2-D"):
        assign_param_groups(net.norm.named_parameters(prefix="norm"),
                            [ParamGroupSpec(name="m", optimizer="muon", lr=0.02)])
    with pytest.raises(ConfigError, match="flatten_conv"):
        assign_param_groups(
            net.named_parameters(),
            [ParamGroupSpec(name="m", ndims=(4,), optimizer="muon", lr=0.02),
             ParamGroupSpec(name="rest", ndims=(1, 2), lr=1e-3)],
        )
    with pytest.raises(ConfigError, match=r"'empty'.*takes no parameter"):
        assign_param_groups(net.named_parameters(), [ParamGroupSpec(name="all", lr=1e-3),
                                                     ParamGroupSpec(name="empty", patterns=("x.*",), lr=1e-3)])
    groups = assign_param_groups(net.named_parameters(), [ParamGroupSpec(name="all", lr=1e-3),
                                                          ParamGroupSpec(name="empty", patterns=("x.*",), lr=1e-3)],
                                 allow_empty=True)
    assert [s.name for s, _ in groups] == ["all"]
    with pytest.raises(ConfigError, match="unique"):
        assign_param_groups(net.named_parameters(), [ParamGroupSpec(name="a", lr=1e-3)] * 2)
    with pytest.raises(ValueError, match=r"betas\[1\]=1.0"):
        ParamGroupSpec(name="a", lr=1e-3, betas=(0.9, 1.0))


# ---- Newton–Schulz


def scalar_map(x: torch.Tensor, steps: int, coeffs: tuple[float, float, float] = NS_COEFFICIENTS) -> torch.Tensor:
    a, b, c = coeffs
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


@pytest.mark.parametrize("shape", [(16, 16), (12, 40), (40, 12), (3, 7, 9)])
def test_newton_schulz_acts_on_singular_values_only(shape: tuple[int, ...]) -> None:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = newton_schulz(g, steps=5, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    normalised = s / (torch.linalg.matrix_norm(g, keepdim=True).squeeze(-1) + 1e-7)
    expected = u @ torch.diag_embed(scalar_map(normalised, 5)) @ vh
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (48, 48)])
def test_newton_schulz_singular_values_in_quintic_band(shape: tuple[int, int]) -> None:
    # Well-conditioned input (singular values spread over 5 * [0.3, 1]): every normalised one is above 0.05.
    gen = torch.Generator().manual_seed(2)
    q1, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=gen))
    r = min(shape)
    s = 5 * torch.linspace(0.3, 1.0, r)
    g = q1[:, :r] @ torch.diag(s) @ q2[:r, :]
    assert (s / torch.linalg.matrix_norm(g)).min() > 0.05
    sv = torch.linalg.svdvals(newton_schulz(g))
    # For x0 in [0.05, 1], five steps of p(x) land in [0.6818, 1.1344] (computed from the scalar map).
    band = scalar_map(torch.linspace(0.05, 1.0, 20001, dtype=torch.float64), 5)
    assert band.min() > 0.68 and band.max() < 1.135
    assert sv.min() > band.min() - 1e-3 and sv.max() < band.max() + 1e-3
    # Orthogonal-ish: the input's condition number 3.3 becomes at most 1.135 / 0.68.
    assert sv.max() / sv.min() < 1.7


def test_newton_schulz_bf16_flag_close_to_fp32() -> None:
    g = torch.randn(24, 40, generator=torch.Generator().manual_seed(3))
    out16 = newton_schulz(g, dtype=torch.bfloat16)
    assert out16.dtype == torch.bfloat16
    out32 = newton_schulz(g)
    assert (out16.float() - out32).norm() < 0.06 * out32.norm()
    sv = torch.linalg.svdvals(out16.float())
    assert sv.min() > 0.66 and sv.max() < 1.16


def test_update_scales() -> None:
    assert muon_update_scale(64, 16, "spectral") == 2.0
    assert muon_update_scale(16, 64, "spectral") == 1.0
    assert muon_update_scale(16, 64, "moonlight") == pytest.approx(0.2 * 8)
    assert muon_update_scale(16, 64, "none") == 1.0


def test_moonlight_scale_matches_adamw_rms() -> None:
    # An orthogonal [r, c] update has RMS 1/sqrt(max(r, c)); the Moonlight scale brings it to ~0.2 (AdamW-like).
    p = torch.nn.Parameter(torch.zeros(32, 96))
    opt = Muon([p], lr=1.0, update_scale="moonlight", nesterov=False)
    p.grad = torch.randn(32, 96, generator=torch.Generator().manual_seed(4))
    opt.step()
    rms = p.detach().pow(2).mean().sqrt().item()
    assert 0.2 * 0.68 < rms < 0.2 * 1.135


# ---- Muon against a reference written from the definition


def reference_orthogonalise(m: torch.Tensor, steps: int, coeffs: tuple[float, float, float]) -> torch.Tensor:
    """U diag(p^steps(s / ||m||_F)) V^T in float64: the spectral form of the Newton–Schulz iteration."""
    m64 = m.double()
    u, s, vh = torch.linalg.svd(m64, full_matrices=False)
    return u @ torch.diag(scalar_map(s / (torch.linalg.matrix_norm(m64) + 1e-7), steps, coeffs)) @ vh


def reference_muon_step(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
                        *, lr: float, mu: float, nesterov: bool, wd: float, scale_kind: str) -> None:
    """One Muon step as a plain loop over parameters, in float64."""
    for p, g, buf in zip(params, grads, bufs, strict=True):
        buf.mul_(mu).add_(g)
        d = g + mu * buf if nesterov else buf.clone()
        rows, cols = d.shape[0], d[0].numel()
        o = reference_orthogonalise(d.reshape(rows, cols), 5, NS_COEFFICIENTS).reshape(p.shape)
        if scale_kind == "spectral":
            scale = max(1.0, rows / cols) ** 0.5
        elif scale_kind == "moonlight":
            scale = 0.2 * math.sqrt(max(rows, cols))
        else:
            scale = 1.0
        p.mul_(1 - lr * wd).sub_(lr * scale * o)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("scale_kind", ["spectral", "moonlight", "none"])
def test_muon_matches_reference_over_steps(nesterov: bool, scale_kind: str) -> None:
    gen = torch.Generator().manual_seed(5)
    shapes = [(16, 24), (24, 8), (4, 2, 3, 3)]
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    ref = [p.detach().double().clone() for p in params]
    bufs = [torch.zeros_like(r) for r in ref]
    opt = Muon(params, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1, update_scale=scale_kind,
               flatten_conv=True)
    for _ in range(6):
        grads = [torch.randn(*s, generator=gen) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        reference_muon_step(ref, [g.double() for g in grads], bufs, lr=0.05, mu=0.9, nesterov=nesterov, wd=0.1,
                            scale_kind=scale_kind)
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-4, atol=1e-4)


def test_muon_rejects_vectors() -> None:
    with pytest.raises(ConfigError, match=r"2-D weights only, got shape \[5\]"):
        Muon([torch.nn.Parameter(torch.zeros(5))])
    with pytest.raises(ConfigError, match="flatten_conv"):
        Muon([torch.nn.Parameter(torch.zeros(4, 2, 3, 3))])


# ---- AdamW groups against torch.optim.AdamW


@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_groups_match_torch_adamw_bitwise(foreach: bool) -> None:
    specs = [
        ParamGroupSpec(name="decay", ndims=(2, 4), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95)),
        ParamGroupSpec(name="no_decay", ndims=(1,), lr=1e-3, weight_decay=0.0, betas=(0.8, 0.99), eps=1e-6),
    ]
    net, ref_net = make_net(), make_net()
    opt = build_optimizer(net, specs, adamw_foreach=foreach)
    ref = torch.optim.AdamW(
        [
            {"params": [p for p in ref_net.parameters() if p.ndim != 1], "lr": 3e-3, "weight_decay": 0.1,
             "betas": (0.9, 0.95)},
            {"params": [p for p in ref_net.parameters() if p.ndim == 1], "lr": 1e-3, "weight_decay": 0.0,
             "betas": (0.8, 0.99), "eps": 1e-6},
        ],
        foreach=foreach,
    )
    assert train(opt, net, range(5)) == train(ref, ref_net, range(5))
    for p, q in zip(net.parameters(), ref_net.parameters(), strict=True):
        assert torch.equal(p, q)


# ---- lr per group, scheduler hook, resume


def test_lr_per_group_respected() -> None:
    gen = torch.Generator().manual_seed(6)
    w0, v0, g_w, g_v = (torch.randn(8, 6, generator=gen), torch.randn(6, generator=gen),
                        torch.randn(8, 6, generator=gen), torch.randn(6, generator=gen))
    named = [(f"{kind}{i}", torch.nn.Parameter(t.clone())) for kind, t in (("w", w0), ("v", v0)) for i in (1, 2)]
    specs = [ParamGroupSpec(name=f"w{i}", patterns=(f"w{i}",), optimizer="muon", lr=0.01 * i) for i in (1, 2)]
    specs += [ParamGroupSpec(name=f"v{i}", patterns=(f"v{i}",), lr=1e-3 * i) for i in (1, 2)]
    opt = build_optimizer(named, specs)
    assert opt.group_lrs() == {"w1": 0.01, "w2": 0.02, "v1": 1e-3, "v2": 2e-3}
    for name, p in named:
        p.grad = (g_w if name.startswith("w") else g_v).clone()
    opt.step()
    d = {name: (p.detach() - (w0 if name.startswith("w") else v0)) for name, p in named}
    torch.testing.assert_close(d["w2"], 2 * d["w1"])
    torch.testing.assert_close(d["v2"], 2 * d["v1"], rtol=1e-5, atol=3e-7)  # fp32 cancellation in p - p0
    # AdamW's first step moves every coordinate by ~lr.
    torch.testing.assert_close(d["v1"].abs(), torch.full((6,), 1e-3), rtol=1e-3, atol=0)


def test_setting_group_lr_changes_the_step() -> None:
    net, ref_net = make_net(), make_net()
    opt, ref_opt = build_optimizer(net, MIXED_SPECS), build_optimizer(ref_net, MIXED_SPECS)
    for g in opt.param_groups:
        g["lr"] = g["lr"] * 0.5
    train(opt, net, range(1))
    train(ref_opt, ref_net, range(1))
    assert not torch.equal(net.attn_q.weight, ref_net.attn_q.weight)
    assert not torch.equal(net.norm.weight, ref_net.norm.weight)


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_roundtrip_resumes_exactly() -> None:
    net = make_net()
    opt = build_optimizer(net, MIXED_SPECS)
    train(opt, net, range(3))
    saved_model = copy.deepcopy(net.state_dict())
    for g in opt.param_groups:  # a scheduler changed the lr before the checkpoint was taken
        g["lr"] *= 0.7
    saved_opt = roundtrip(opt.state_dict())
    straight = train(opt, net, range(3, 7))

    resumed_net = make_net(seed=123)
    resumed_net.load_state_dict(saved_model)
    resumed_opt = build_optimizer(resumed_net, MIXED_SPECS)
    resumed_opt.load_state_dict(saved_opt)
    assert resumed_opt.group_lrs() == opt.group_lrs()
    assert train(resumed_opt, resumed_net, range(3, 7)) == straight
    for p, q in zip(net.parameters(), resumed_net.parameters(), strict=True):
        assert torch.equal(p, q)
    # After loading, param_groups still drive the inner optimizers.
    resumed_opt.param_groups[0]["lr"] = 0.0
    before = resumed_net.attn_q.weight.detach().clone()
    resumed_opt.param_groups[0]["weight_decay"] = 0.0
    train(resumed_opt, resumed_net, range(7, 8))
    assert torch.equal(resumed_net.attn_q.weight, before)


def test_load_state_dict_rejects_other_groups() -> None:
    net = make_net()
    opt = build_optimizer(net, MIXED_SPECS)
    train(opt, net, range(1))
    other = build_optimizer(make_net(), [ParamGroupSpec(name="all", lr=1e-3)])
    with pytest.raises(CheckpointError, match="same parameter group config"):
        other.load_state_dict(opt.state_dict())


def test_clip_grad_norm_matches_torch() -> None:
    net, ref_net = make_net(), make_net()
    opt = build_optimizer(net, MIXED_SPECS)
    for n in (net, ref_net):
        (loss_of(n, 0) * 100).backward()
    norm = opt.clip_grad_norm(0.5)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_net.parameters(), 0.5)
    assert norm == pytest.approx(ref_norm.item(), rel=1e-6) and norm > 0.5
    for p, q in zip(net.parameters(), ref_net.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    assert opt.clip_grad_norm(None) == pytest.approx(0.5, rel=1e-5)  # measure only: already clipped
    net.mlp.weight.grad[0, 0] = float("nan")
    before = net.attn_q.weight.grad.clone()
    assert math.isnan(opt.clip_grad_norm(0.5))
    assert torch.equal(net.attn_q.weight.grad, before)


def test_muon_with_adamw_fits_a_small_regression() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen)
    y = torch.tanh(x @ torch.randn(16, 4, generator=gen))
    torch.manual_seed(1)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                              torch.nn.Linear(64, 4))
    opt = build_optimizer(mlp, [ParamGroupSpec(name="hidden", patterns=("2.weight",), optimizer="muon", lr=0.02),
                                ParamGroupSpec(name="rest", exclude=("2.weight",), lr=3e-3)])
    losses = []
    for _ in range(100):
        loss = ((mlp(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_muon_bf16_flag_in_the_optimizer() -> None:
    gen = torch.Generator().manual_seed(7)
    w0, grad = torch.randn(16, 32, generator=gen), torch.randn(16, 32, generator=gen)
    p32, p16 = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    for p, dtype in ((p32, "float32"), (p16, "bfloat16")):
        p.grad = grad.clone()
        Muon([p], lr=0.1, ns_dtype=dtype).step()  # type: ignore[arg-type]
    assert p16.dtype == torch.float32
    d32, d16 = p32.detach() - w0, p16.detach() - w0
    assert (d16 - d32).norm() < 0.06 * d32.norm()
    with pytest.raises(ConfigError, match="ns_dtype='float16'"):
        Muon([p32], ns_dtype="float16")  # type: ignore[arg-type]


def test_groups_from_a_config_file_shape() -> None:
    class OptimConfig(ConfigModel):
        groups: tuple[ParamGroupSpec, ...]

    cfg = load_data({"groups": [
        {"name": "mats", "ndims": [2], "optimizer": "muon", "lr": 0.02, "ns_coefficients": [3.4445, -4.775, 2.0315],
         "update_scale": "moonlight"},
        {"name": "rest", "ndims": [1, 4], "lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.1},
    ]}, OptimConfig)
    assert cfg.groups[0].ns_coefficients == NS_COEFFICIENTS and cfg.groups[1].betas == (0.9, 0.95)
    opt = build_optimizer(make_net(), cfg.groups)
    assert [g["name"] for g in opt.param_groups] == ["mats", "rest"]
    with pytest.raises(ConfigError, match=r"groups.0.momentun"):
        load_data({"groups": [{"name": "m", "lr": 0.02, "momentun": 0.9}]}, OptimConfig)
    with pytest.raises(ConfigError, match=r"groups.0.optimizer"):
        load_data({"groups": [{"name": "m", "lr": 0.02, "optimizer": "sgd"}]}, OptimConfig)


def test_stacked_expert_weights_are_orthogonalised_one_by_one() -> None:
    gen = torch.Generator().manual_seed(8)
    w0 = torch.randn(3, 8, 12, generator=gen)
    grads = [torch.randn(3, 8, 12, generator=gen) for _ in range(3)]
    stacked = torch.nn.Parameter(w0.clone())
    singles = [torch.nn.Parameter(w0[e].clone()) for e in range(3)]
    opt_stacked = Muon([stacked], lr=0.05, weight_decay=0.1, update_scale="moonlight", stacked=True)
    opt_singles = Muon(singles, lr=0.05, weight_decay=0.1, update_scale="moonlight")
    for g in grads:
        stacked.grad = g.clone()
        for e, p in enumerate(singles):
            p.grad = g[e].clone()
        opt_stacked.step()
        opt_singles.step()
    torch.testing.assert_close(stacked.detach(), torch.stack([p.detach() for p in singles]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="exclude each other"):
        ParamGroupSpec(name="x", lr=0.02, optimizer="muon", stacked=True, flatten_conv=True)
    groups = assign_param_groups([("experts.w", stacked)],
                                 [ParamGroupSpec(name="experts", optimizer="muon", lr=0.02, stacked=True)])
    assert groups[0][1][0][0] == "experts.w"
