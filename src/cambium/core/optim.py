"""Optimizers: named parameter groups, AdamW (torch's own) and Muon, combined in one optimizer object.

A model's parameters are split into named groups by `ParamGroupSpec`s (glob patterns on parameter names, optional
dimension filter, optional predicate). Every trainable parameter must land in exactly one group: a parameter matched by
no group or by two is a ConfigError naming it. Each group has its own learning rate, weight decay and optimizer kind.

Muon (MomentUm Orthogonalized by Newton–Schulz) updates a 2-D weight `W [rows, cols]` with

    M_t = mu * M_{t-1} + G_t                       (heavy-ball momentum; Nesterov uses G_t + mu * M_t)
    O_t = NS_k(M_t)                                (k quintic Newton–Schulz steps: ~ U V^T of M_t = U S V^T)
    W_t = (1 - lr * wd) * W_{t-1} - lr * s(rows, cols) * O_t

with the shape scale `s` chosen by `update_scale` ("spectral": max(1, rows/cols)**0.5; "moonlight":
0.2 * sqrt(max(rows, cols)), which gives the update the RMS of a typical AdamW update so AdamW learning rates and
weight decay carry over; "none": 1). See docs/optim.md for the derivation and the band of singular values.

`MuonWithAdamW` owns a `Muon` for the Muon groups and a `torch.optim.AdamW` for the rest and behaves as one optimizer:
`param_groups` (in spec order, the dicts shared with the inner optimizers so a scheduler can set `lr`), `step`,
`zero_grad`, `state_dict` / `load_state_dict` (exact resume).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from cambium.core.config import ConfigModel
from cambium.core.errors import CheckpointError, ConfigError

__all__ = [
    "NS_COEFFICIENTS",
    "Muon",
    "MuonWithAdamW",
    "ParamGroupSpec",
    "assign_param_groups",
    "build_optimizer",
    "muon_update_scale",
    "newton_schulz",
]

# Coefficients (a, b, c) of p(x) = a x + b x^3 + c x^5 tuned (Keller Jordan, 2024) to push singular values in
# (0, 1] quickly towards 1 in five steps; they converge to a band around 1, not to 1 exactly (see docs/optim.md).
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

UpdateScale = Literal["spectral", "moonlight", "none"]
NSDtype = Literal["float32", "bfloat16"]
_NS_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}

Predicate = Callable[[str, Tensor], bool]
NamedParams = Iterable[tuple[str, torch.nn.Parameter]]


class ParamGroupSpec(ConfigModel):
    """One named parameter group: which parameters it takes and how they are optimised."""

    name: str = Field(min_length=1, description="Group name, used in metrics (lr per group) and checkpoints.")
    patterns: tuple[str, ...] = Field(
        default=("*",), description="fnmatch globs on parameter names; a parameter matching any of them is taken."
    )
    exclude: tuple[str, ...] = Field(default=(), description="fnmatch globs of parameter names never taken.")
    ndims: tuple[int, ...] | None = Field(
        default=None, description="Only parameters with one of these numbers of dimensions (None: any)."
    )
    optimizer: Literal["adamw", "muon"] = Field(default="adamw", description="Optimizer for this group.")
    lr: float = Field(gt=0.0, description="Base (peak) learning rate of the group; schedules scale it.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="Decoupled weight decay (AdamW and Muon).")
    betas: tuple[float, float] = Field(default=(0.9, 0.95), description="AdamW (beta1, beta2).")
    eps: float = Field(default=1e-8, gt=0.0, description="AdamW epsilon.")
    momentum: float = Field(default=0.95, ge=0.0, lt=1.0, description="Muon momentum mu.")
    nesterov: bool = Field(default=True, description="Muon: orthogonalise G + mu*M (Nesterov) instead of M.")
    ns_steps: int = Field(default=5, ge=1, le=20, description="Muon: Newton–Schulz iterations.")
    ns_coefficients: tuple[float, float, float] = Field(
        default=NS_COEFFICIENTS, description="Muon: (a, b, c) of the quintic a*x + b*x^3 + c*x^5."
    )
    ns_dtype: NSDtype = Field(
        default="float32", description="Muon: dtype of the Newton–Schulz iteration (bfloat16 only when asked)."
    )
    update_scale: UpdateScale = Field(
        default="spectral",
        description="Muon update scale: spectral=max(1,rows/cols)**0.5, moonlight=0.2*sqrt(max(rows,cols)), none=1.",
    )
    flatten_conv: bool = Field(
        default=False, description="Muon: accept >2-D weights (convolutions), reshaped to [out, in*kh*kw]."
    )
    stacked: bool = Field(
        default=False,
        description="Muon: accept >2-D weights as stacks of matrices [..., rows, cols] (e.g. experts [E, out, in]), "
        "each orthogonalised on its own.",
    )

    @model_validator(mode="after")
    def _check(self) -> ParamGroupSpec:
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}]={beta} must be in [0, 1)")
        if not self.patterns:
            raise ValueError(f"group {self.name!r}: patterns=() takes nothing; give at least one glob")
        if self.flatten_conv and self.stacked:
            raise ValueError(f"group {self.name!r}: flatten_conv=true and stacked=true exclude each other")
        return self


def _matches(spec: ParamGroupSpec, name: str, param: Tensor, predicate: Predicate | None) -> bool:
    if not any(fnmatch.fnmatchcase(name, pat) for pat in spec.patterns):
        return False
    if any(fnmatch.fnmatchcase(name, pat) for pat in spec.exclude):
        return False
    if spec.ndims is not None and param.ndim not in spec.ndims:
        return False
    return predicate is None or bool(predicate(name, param))


def assign_param_groups(
    named_params: NamedParams,
    specs: Sequence[ParamGroupSpec],
    predicates: Mapping[str, Predicate] | None = None,
    *,
    allow_empty: bool = False,
) -> list[tuple[ParamGroupSpec, list[tuple[str, torch.nn.Parameter]]]]:
    """Put every trainable parameter into exactly one group.

    A parameter is taken by a spec when its name matches one of `patterns`, none of `exclude`, its ndim is allowed and
    `predicates[spec.name](name, param)` (when given) is true. Parameters with `requires_grad=False` are skipped.
    Raises ConfigError for a parameter taken by no group or by two, for a group that takes nothing (unless
    `allow_empty`, which drops it), for a Muon group given a parameter it cannot orthogonalise, and for duplicate names.
    """
    predicates = dict(predicates or {})
    names = [spec.name for spec in specs]
    if not specs:
        raise ConfigError("no parameter groups given; pass at least one ParamGroupSpec")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"parameter group names must be unique; repeated: {duplicates}")
    unknown = sorted(set(predicates) - set(names))
    if unknown:
        raise ConfigError(f"predicates given for unknown groups {unknown}; groups are {names}")

    taken: dict[str, list[tuple[str, torch.nn.Parameter]]] = {spec.name: [] for spec in specs}
    unmatched: list[str] = []
    for pname, param in named_params:
        if not param.requires_grad:
            continue
        hits = [spec for spec in specs if _matches(spec, pname, param, predicates.get(spec.name))]
        if not hits:
            unmatched.append(pname)
        elif len(hits) > 1:
            raise ConfigError(
                f"parameter {pname!r} (shape {list(param.shape)}) is matched by groups "
                f"{[s.name for s in hits]}; make the patterns/exclude/ndims of these groups disjoint"
            )
        else:
            spec = hits[0]
            if spec.optimizer == "muon":
                _check_muon_param(spec, pname, param)
            taken[spec.name].append((pname, param))
    if unmatched:
        shown = unmatched[:8] + (["..."] if len(unmatched) > 8 else [])
        raise ConfigError(
            f"{len(unmatched)} parameter(s) matched by no group: {shown}; add a group (e.g. patterns=('*',) with "
            "exclude=...) that takes them"
        )
    result = []
    for spec in specs:
        if not taken[spec.name]:
            if allow_empty:
                continue
            raise ConfigError(
                f"group {spec.name!r} (patterns={list(spec.patterns)}) takes no parameter; fix its patterns "
                "or pass allow_empty=True"
            )
        result.append((spec, taken[spec.name]))
    return result


def _check_muon_param(spec: ParamGroupSpec, name: str, param: Tensor) -> None:
    if param.ndim == 2 or (param.ndim > 2 and (spec.flatten_conv or spec.stacked)):
        return
    hint = " (set flatten_conv=true for convolutions or stacked=true for stacked experts)" if param.ndim > 2 else ""
    raise ConfigError(
        f"group {spec.name!r} uses muon but parameter {name!r} has shape {list(param.shape)}; Muon takes 2-D "
        f"weights only{hint}: give it to an AdamW group (e.g. ndims=(2,) on the muon group)"
    )


def newton_schulz(
    g: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    dtype: torch.dtype = torch.float32,
    eps: float = 1e-7,
) -> Tensor:
    """Approximate the orthogonal factor U V^T of `g = U S V^T` by `steps` quintic Newton–Schulz iterations.

    g: [..., m, n]. Returns [..., m, n] in `dtype`. Each singular value s of g becomes p^steps(s / ||g||_F) with
    p(x) = a x + b x^3 + c x^5, since odd matrix polynomials X -> a X + b (X X^T) X + c (X X^T)^2 X act on singular
    values alone. The iteration runs on the wide orientation (m <= n) so X X^T is the smaller Gram matrix.
    """
    if g.ndim < 2:
        raise ConfigError(f"newton_schulz needs a matrix [..., m, n], got shape {list(g.shape)}")
    a, b, c = coefficients
    x = g.to(dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    # Dividing by the Frobenius norm puts every singular value in (0, 1], the basin where p^k approaches 1.
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return x.mT if transposed else x


def muon_update_scale(rows: int, cols: int, kind: UpdateScale) -> float:
    """Multiplier of the orthogonalised update for a [rows, cols] weight (see the module docstring)."""
    if kind == "spectral":
        return max(1.0, rows / cols) ** 0.5
    if kind == "moonlight":
        return 0.2 * math.sqrt(max(rows, cols))
    if kind == "none":
        return 1.0
    raise ConfigError(f"update_scale={kind!r} is not one of 'spectral', 'moonlight', 'none'")


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights; with `flatten_conv`, convolution weights viewed as [out, in*kh*kw]; with `stacked`,
    stacks of matrices [..., rows, cols] (expert weights [E, out, in]) orthogonalised matrix by matrix.

    State per parameter: `momentum_buffer` (same shape as the parameter). Hyper-parameters live in each param group so
    a scheduler can change `lr` and groups can differ.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        ns_dtype: NSDtype = "float32",
        update_scale: UpdateScale = "spectral",
        flatten_conv: bool = False,
        stacked: bool = False,
    ) -> None:
        if lr <= 0.0 or not 0.0 <= momentum < 1.0 or weight_decay < 0.0:
            raise ConfigError(f"Muon: need lr > 0, 0 <= momentum < 1, weight_decay >= 0; got {lr=}, "
                              f"{momentum=}, {weight_decay=}")
        if ns_dtype not in _NS_DTYPES:
            raise ConfigError(f"Muon: ns_dtype={ns_dtype!r} is not one of {sorted(_NS_DTYPES)}")
        muon_update_scale(1, 1, update_scale)
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
            ns_coefficients=tuple(ns_coefficients), ns_dtype=ns_dtype, update_scale=update_scale,
            flatten_conv=flatten_conv, stacked=stacked,
        )
        if flatten_conv and stacked:
            raise ConfigError("Muon: flatten_conv=True and stacked=True exclude each other")
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if not (p.ndim == 2 or (p.ndim > 2 and (group["flatten_conv"] or group["stacked"]))):
                    raise ConfigError(
                        f"Muon takes 2-D weights only, got shape {list(p.shape)}"
                        + (" (set flatten_conv=True for convolutions or stacked=True for stacked experts)"
                           if p.ndim > 2 else "")
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            ns_dtype = _NS_DTYPES[group["ns_dtype"]]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(grad)
                direction = grad.add(buf, alpha=mu) if group["nesterov"] else buf
                matrix = direction if group["stacked"] else direction.reshape(direction.shape[0], -1)
                ortho = newton_schulz(matrix, group["ns_steps"], group["ns_coefficients"], ns_dtype)
                scale = muon_update_scale(matrix.shape[-2], matrix.shape[-1], group["update_scale"])
                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)
                p.add_(ortho.reshape(p.shape).to(p.dtype), alpha=-lr * scale)
        return loss


def _group_dict(spec: ParamGroupSpec, named: list[tuple[str, torch.nn.Parameter]]) -> dict[str, Any]:
    group: dict[str, Any] = {"params": list(named), "name": spec.name, "lr": spec.lr,
                             "weight_decay": spec.weight_decay}
    if spec.optimizer == "adamw":
        group.update(betas=tuple(spec.betas), eps=spec.eps)
    else:
        group.update(
            momentum=spec.momentum, nesterov=spec.nesterov, ns_steps=spec.ns_steps,
            ns_coefficients=tuple(spec.ns_coefficients), ns_dtype=spec.ns_dtype, update_scale=spec.update_scale,
            flatten_conv=spec.flatten_conv, stacked=spec.stacked,
        )
    return group


class MuonWithAdamW:
    """One optimizer over named groups: Muon for the `optimizer="muon"` groups, torch.optim.AdamW for the others.

    `param_groups` lists the group dicts in spec order; they are the inner optimizers' own dicts, so setting
    `group["lr"]` (as `cambium.core.schedule.LRScheduler` does) changes the step. Each dict carries `name` and
    `param_names`.
    """

    def __init__(
        self,
        groups: Sequence[tuple[ParamGroupSpec, list[tuple[str, torch.nn.Parameter]]]],
        *,
        adamw_foreach: bool | None = None,
    ) -> None:
        if not groups:
            raise ConfigError("MuonWithAdamW needs at least one non-empty parameter group")
        self.kinds: list[str] = [spec.optimizer for spec, _ in groups]
        adamw_groups = [_group_dict(s, n) for s, n in groups if s.optimizer == "adamw"]
        muon_groups = [_group_dict(s, n) for s, n in groups if s.optimizer == "muon"]
        self.adamw: torch.optim.AdamW | None = (
            torch.optim.AdamW(adamw_groups, foreach=adamw_foreach) if adamw_groups else None
        )
        self.muon: Muon | None = Muon(muon_groups) if muon_groups else None
        by_name = {g["name"]: g for opt in (self.adamw, self.muon) if opt is not None for g in opt.param_groups}
        self.param_groups: list[dict[str, Any]] = [by_name[spec.name] for spec, _ in groups]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [opt for opt in (self.adamw, self.muon) if opt is not None]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def clip_grad_norm(self, max_norm: float | None) -> float:
        """Scale all gradients so their global L2 norm is at most `max_norm` (None: only measure it).

        Returns the norm before clipping (log it as `grad_norm`); a non-finite norm is returned as is and nothing is
        scaled, so the caller can count and skip the step.
        """
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return 0.0
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))
        total = float(norm)
        if max_norm is not None and math.isfinite(total) and total > max_norm:
            coef = max_norm / (total + 1e-6)
            for grad in grads:
                grad.mul_(coef)
        return total

    def group_lrs(self) -> dict[str, float]:
        """Current learning rate of every group by name (for the `lr/<group>` metrics)."""
        return {g["name"]: float(g["lr"]) for g in self.param_groups}

    def state_dict(self) -> dict[str, Any]:
        """A plain dict of tensors, numbers and strings (loadable with `torch.load(weights_only=True)`)."""
        return {
            "groups": [[g["name"], kind] for g, kind in zip(self.param_groups, self.kinds, strict=True)],
            "adamw": self.adamw.state_dict() if self.adamw is not None else None,
            "muon": self.muon.state_dict() if self.muon is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()` taken from an optimizer built with the same groups and parameter names."""
        mine = [[g["name"], kind] for g, kind in zip(self.param_groups, self.kinds, strict=True)]
        theirs = [list(x) for x in state.get("groups", [])]
        if theirs != mine:
            raise CheckpointError(f"optimizer state has groups {theirs} but this optimizer has {mine}; resume with "
                                  "the same parameter group config")
        for key, opt in (("adamw", self.adamw), ("muon", self.muon)):
            saved = state.get(key)
            if opt is None:
                continue
            if saved is None:
                raise CheckpointError(f"optimizer state has no {key!r} part but this optimizer needs one")
            for mine_g, their_g in zip(opt.param_groups, saved["param_groups"], strict=True):
                if list(mine_g["param_names"]) != list(their_g.get("param_names", [])):
                    raise CheckpointError(
                        f"group {mine_g['name']!r}: saved parameter names differ from the model's "
                        f"({len(their_g.get('param_names', []))} saved vs {len(mine_g['param_names'])}); resume "
                        "with the same model"
                    )
            opt.load_state_dict(saved)
        # load_state_dict replaces the inner group dicts; re-point ours at the new ones.
        by_name = {g["name"]: g for opt in self.optimizers for g in opt.param_groups}
        self.param_groups = [by_name[g["name"]] for g in self.param_groups]


def build_optimizer(
    model_or_named: torch.nn.Module | NamedParams,
    specs: Sequence[ParamGroupSpec],
    predicates: Mapping[str, Predicate] | None = None,
    *,
    allow_empty: bool = False,
    adamw_foreach: bool | None = None,
) -> MuonWithAdamW:
    """Assign the parameters of a module (or `(name, param)` pairs) to `specs` and build the optimizer."""
    named = model_or_named.named_parameters() if isinstance(model_or_named, torch.nn.Module) else model_or_named
    groups = assign_param_groups(named, specs, predicates, allow_empty=allow_empty)
    return MuonWithAdamW(groups, adamw_foreach=adamw_foreach)
