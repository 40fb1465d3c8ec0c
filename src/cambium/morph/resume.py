"""Kasmina's state for exact resume: what a checkpoint must hold beyond the model and host optimizer.

`export_kasmina` returns a JSON-able dict (lifecycles, histories, embargoes, field reports, pending kernel outcomes,
counters) for the checkpoint's data cursor and a tensor dict (seed optimizers, FINE_TUNING snapshots) for
`torch.save`. `import_kasmina` puts them back on a freshly wrapped model before `model.load_state_dict`: kernels are
reloaded from Urza (hash-verified) and compilations that were in flight are submitted again.
"""

from __future__ import annotations

import itertools
from typing import Any

from torch import nn

from cambium.morph.contracts import CompilationRequest, FieldReport, KernelReady, SeedState, StateChange, parse
from cambium.morph.kasmina import _MODE, Kasmina

__all__ = ["export_kasmina", "import_kasmina"]

S = SeedState


def export_kasmina(k: Kasmina) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything Kasmina needs to resume at this boundary: (JSON-able dict, tensor dict for torch.save).

    Model and host-optimizer tensors are not here: they live in the model's and the optimizer's state dicts.
    """
    seeds = {}
    tensors: dict[str, Any] = {"optimizers": {}, "ft_snapshots": {}}
    for loc, r in k.seeds.items():
        seeds[loc] = {
            "state": r.life.state.value, "state_epoch": r.life.state_epoch,
            "history": [c.model_dump(mode="json") for c in r.life.history],
            "blueprint_id": r.blueprint_id, "artifact_id": r.artifact_id, "request_id": r.request_id,
            "embargo_until": r.embargo_until, "failures": r.failures,
            "health_at_decision": r.health_at_decision, "epoch_started": r.epoch_started,
            "graft_step": r.graft_step, "metric_without": r.metric_without, "metric_eval": r.metric_eval,
            "history_start": r.history_start, "alpha": r.slot.alpha, "shape": list(r.slot.shape),
        }
        if r.optimizer is not None:
            tensors["optimizers"][loc] = r.optimizer.state_dict()
        if r.ft_snapshot is not None:
            tensors["ft_snapshots"][loc] = r.ft_snapshot
    meta = {
        "epoch": k.clock.epoch, "seeds": seeds, "good_loss": k._good_loss,
        "reports": [rep.model_dump(mode="json") for rep in k.reports], "skipped": dict(k.skipped),
        "host_rollbacks": k.host_rollbacks, "seen_commands": sorted(k._seen_commands),
        "next_id": k._next_id(), "fossil_order": list(k._fossil_order),
        "ready": {key: val.model_dump(mode="json") for key, val in k._ready.items()},
    }
    return meta, tensors



def import_kasmina(k: Kasmina, meta: dict[str, Any], tensors: dict[str, Any]) -> list[list[nn.Parameter]]:
    """Restore `export_state` output onto a freshly wrapped model, before `model.load_state_dict`.

    Kernels are reloaded from Urza (hash-verified); compilations that were in flight are submitted again.
    Returns the fossilized parameter groups in the order they joined the host optimizer (add them as param
    groups before loading the optimizer's state).
    """
    k.clock.epoch = int(meta["epoch"])
    k._good_loss = meta["good_loss"]
    k.reports = [parse(FieldReport, rep) for rep in meta["reports"]]
    k.skipped.update(meta["skipped"])
    k.host_rollbacks = int(meta["host_rollbacks"])
    k._seen_commands = set(meta["seen_commands"])
    k._ids = itertools.count(int(meta["next_id"]))
    k._ready = {key: parse(KernelReady, val) for key, val in meta["ready"].items()}
    for loc, s in meta["seeds"].items():
        r = k.seeds[loc]
        r.life.state = SeedState(s["state"])
        r.life.state_epoch = int(s["state_epoch"])
        r.life.history = [parse(StateChange, c) for c in s["history"]]
        for key in ("blueprint_id", "artifact_id", "request_id", "embargo_until", "failures",
                    "health_at_decision", "epoch_started", "graft_step", "metric_without", "metric_eval",
                    "history_start"):
            setattr(r, key, s[key])
        r.slot.alpha = float(s["alpha"])
        r.slot.shape = tuple(s["shape"])
        if r.life.state in _MODE and r.artifact_id is not None:
            r.slot.kernel = k.cache.get(r.artifact_id, k._load_artifact)
            if r.life.state != S.FOSSILIZED:
                k._new_optimizer(r)
                if r.optimizer is not None and loc in tensors["optimizers"]:
                    r.optimizer.load_state_dict(tensors["optimizers"][loc])
        r.ft_snapshot = tensors["ft_snapshots"].get(loc)
        k._apply_mode(r)
        if r.life.state == S.GERMINATED and r.request_id not in k._ready:
            assert r.blueprint_id is not None and r.request_id is not None
            k.bus.publish(
                "compilation.blueprint.submitted",
                CompilationRequest(request_id=r.request_id, blueprint_id=r.blueprint_id, settings=k.settings),
            )
    k._fossil_order = list(meta["fossil_order"])
    frozen = k.host_frozen()
    for p in k.host_parameters():
        p.requires_grad_(not frozen)
    groups = []
    for loc in k._fossil_order:
        kernel = k.seeds[loc].slot.kernel
        assert kernel is not None
        groups.append(list(kernel.parameters()))
    return groups
