"""MOR-6: the learned controller — the GNN over graphs of any size, its masks, its message passing against a dense
adjacency reference (outputs and gradients), policy files verified by hash, Simic learning the heuristic from a
recorded replay buffer (and its advantage weighting preferring what paid), the replay buffer deduplicated across a
stop/resume and a SIGKILL/resume, and a GNN policy loaded and deciding over HTTP."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cambium.core.config import load
from cambium.core.errors import ConfigError
from cambium.morph.api import create_app
from cambium.morph.bus import InProcessBus
from cambium.morph.config import CONFIG_MODEL, PolicyConfig
from cambium.morph.contracts import (
    AdaptationKind,
    AdaptationSignal,
    FieldReport,
    HealthSignal,
    Seed,
    SeedState,
    StateChange,
    SystemStatePacket,
    parse,
)
from cambium.morph.controller import HeuristicPolicy, gnn_policy
from cambium.morph.field_reports import ReplayRecorder, load_experience
from cambium.morph.gnn import (
    N_FEATURES,
    GnnPolicy,
    MeanConv,
    PolicyFileError,
    TamiyoGNN,
    build_graph,
    layouts_of,
    load_policy,
    save_policy,
    vocabulary,
)
from cambium.morph.library import Urza
from cambium.morph.simic import SimicConfig, evaluate, train_simic

REPO = Path(__file__).resolve().parents[2]
CFG = PolicyConfig()
VOCAB, LAYOUTS = vocabulary(CFG), layouts_of(CFG)
STATES = [SeedState.DORMANT] * 6 + [SeedState.TRAINING, SeedState.FOSSILIZED, SeedState.CULLED]


def _packet(rng: random.Random, n: int, epoch: int = 5, nested: bool = True) -> SystemStatePacket:
    seeds, health = [], []
    for i in range(n):
        loc = f"stages.{i // 2}.{i % 2}" if nested else f"blocks.{i}"
        shape = ("B", 8 * (1 + i % 3), 16, 16) if i % 4 != 3 else ("B", 16, 32)
        state = rng.choice(STATES)
        seeds.append(Seed(seed_id=loc, index=i, location=loc, state=state, shape=shape,
                          embargo_until=rng.choice([0, 0, 0, epoch + 1]), failures=rng.choice([0, 0, 1, 2])))
        health.append(HealthSignal(
            seed_id=loc, index=i, epoch=epoch, state=state, activation_mean=rng.uniform(-1, 1),
            activation_variance=rng.uniform(0, 2), gradient_norm=rng.uniform(0, 0.1), dead_unit_ratio=rng.random(),
            health_score=rng.random(), confidence=rng.uniform(0.5, 1.0), samples=rng.randint(1, 20)))
    return SystemStatePacket(epoch=epoch, step=10 * epoch, train_loss=rng.uniform(0.5, 2.5), health=tuple(health),
                             seeds=tuple(seeds), adaptations_this_epoch=rng.choice([0, 0, 1]))


def _net(hidden: int = 16, layers: int = 2, seed: int = 0) -> TamiyoGNN:
    torch.manual_seed(seed)
    return TamiyoGNN(N_FEATURES, hidden, layers, len(VOCAB))


def _policy(net: TamiyoGNN, budget: int = 2) -> GnnPolicy:
    return GnnPolicy(net, {"vocabulary": list(VOCAB), "tensors_sha256": "x"}, CFG, budget)


@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_forward_on_graphs_of_varying_size(n: int) -> None:
    g = build_graph(_packet(random.Random(n), n), VOCAB, LAYOUTS, 2)
    modules = {s.rsplit(".", k)[0] for s in g.seed_ids for k in range(1, s.count(".") + 1)} | set(g.seed_ids)
    assert g.x.shape == (n + len(modules) + 1, N_FEATURES)  # + the root module
    assert g.edge_index.max() < g.x.shape[0] and g.edge_index.shape[0] == 2
    germ, bp, value = _net()(g.x, g.edge_index, g.seed_index)
    assert germ.shape == (n,) and bp.shape == (n, len(VOCAB)) and value.shape == (n,)
    assert torch.isfinite(germ).all() and torch.isfinite(bp).all()


def test_masks_forbid_illegal_germinations_and_blueprints() -> None:
    net = _net()
    with torch.no_grad():  # every seed wants to germinate, and most with the token blueprints
        net.germ[-1].bias.fill_(50.0)
        net.blueprint.bias.copy_(torch.tensor([30.0 if n in CFG.blueprints_tokens else 0.0 for n in VOCAB]))
    rng = random.Random(3)
    for _ in range(20):
        packet = _packet(rng, 12)
        pol = _policy(net, budget=12)
        g = build_graph(packet, VOCAB, LAYOUTS, 12)
        signals = pol.decide(packet)
        by_id = {s.seed_id: s for s in packet.seeds}
        legal = {sid for sid, ok in zip(g.seed_ids, g.legal.tolist(), strict=True) if ok}
        assert {s.seed_id for s in signals} <= legal
        assert len(signals) == min(len(legal), 12 - packet.adaptations_this_epoch)
        for s in signals:
            seed = by_id[s.seed_id]
            assert seed.state == SeedState.DORMANT and packet.epoch >= seed.embargo_until
            assert s.blueprint_name in LAYOUTS[len(seed.shape)]
    packet = _packet(rng, 12).model_copy(update={"adaptations_this_epoch": 2})
    assert _policy(net, budget=2).decide(packet) == []  # no budget left


def _random_graph(n: int, e: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=g, dtype=torch.float64)
    edges = torch.randint(0, n, (2, e), generator=g)  # repeated edges and self loops included; some nodes isolated
    adj = torch.zeros(n, n, dtype=torch.float64)
    adj.index_put_((edges[1], edges[0]), torch.ones(e, dtype=torch.float64), accumulate=True)
    return x, edges, adj


@pytest.mark.parametrize("n,e", [(1, 0), (5, 3), (9, 30)])
def test_message_passing_equals_the_dense_adjacency_reference(n: int, e: int) -> None:
    x, edges, adj = _random_graph(n, e, seed=n)
    net = _net(hidden=8, layers=3).double()
    seeds = torch.arange(min(n, 4))
    outs = []
    for dense in (False, True):
        net.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = net.forward_dense(xi, adj, seeds) if dense else net(xi, edges, seeds)
        sum(o.pow(2).sum() for o in out).backward()  # type: ignore[misc]
        outs.append((out, xi.grad, [p.grad.clone() for p in net.parameters() if p.grad is not None]))
    (sparse_out, sparse_gx, sparse_gp), (dense_out, dense_gx, dense_gp) = outs
    for a, b in zip(sparse_out, dense_out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sparse_gx, dense_gx, rtol=1e-10, atol=1e-12)
    assert len(sparse_gp) == len(dense_gp) > 0
    for a, b in zip(sparse_gp, dense_gp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    conv = MeanConv(N_FEATURES, 4).double()
    torch.testing.assert_close(conv(x, edges), conv.dense(x, adj))


def test_policy_file_round_trip_and_hash_verification(tmp_path: Path) -> None:
    net = _net()
    path = tmp_path / "p.safetensors"
    sha = save_policy(path, net, {"hidden": 16, "layers": 2, "vocabulary": list(VOCAB)})
    loaded, header = load_policy(path)
    assert header["tensors_sha256"] == sha and header["vocabulary"] == list(VOCAB)
    packet = _packet(random.Random(0), 6)
    assert _policy(loaded).decide(packet) == _policy(net).decide(packet)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # a flipped bit in the last tensor
    (tmp_path / "tampered.safetensors").write_bytes(bytes(raw))
    with pytest.raises(PolicyFileError, match="modified or corrupted"):
        load_policy(tmp_path / "tampered.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a policy")
    with pytest.raises(PolicyFileError, match="not a safetensors file"):
        load_policy(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(PolicyFileError, match="no valid cambium policy header"):
        load_policy(tmp_path / "foreign.safetensors")
    with pytest.raises(PolicyFileError, match="does not exist"):
        load_policy(tmp_path / "missing.safetensors")
    cfg = load(REPO / "configs/morph/tiny.toml", CONFIG_MODEL,
               ["controller.kind=gnn", f"controller.policy={tmp_path / 'tampered.safetensors'}"])
    with pytest.raises(ConfigError, match=r"^controller\.policy: .*modified or corrupted"):
        gnn_policy(cfg)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=400), prefix=st.integers(0, 10_000))
def test_fuzzed_policy_files_are_one_clear_error(tmp_path_factory: pytest.TempPathFactory, raw: bytes,
                                                 prefix: int) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "p.safetensors"
    path.write_bytes(prefix.to_bytes(8, "little") + raw)
    with pytest.raises(PolicyFileError) as exc:
        load_policy(path)
    assert "\n" not in str(exc.value)


def _fill_buffer(urza: Urza, runs: int, boundaries: int, seed: int,
                 reward_for: dict[str, SeedState] | None = None, explore: bool = False,
                 behaviour: PolicyConfig = CFG) -> None:
    """Boundaries decided by the real heuristic (or, with `explore`, by one picking a random legal blueprint),
    recorded through the trainer's ReplayRecorder; germinations end as `reward_for[blueprint]` (default: random)."""
    rng = random.Random(seed)
    heuristic = HeuristicPolicy(behaviour, 2)
    for r in range(runs):
        rec = ReplayRecorder(urza, f"run{r}", policy="heuristic", budget=2)
        for epoch in range(1, boundaries + 1):
            packet = _packet(rng, rng.randint(2, 8), epoch=epoch, nested=r % 2 == 0)
            signals = heuristic.decide(packet)
            if explore:
                signals = [s.model_copy(update={"blueprint_name": rng.choice(
                    LAYOUTS[len(next(x for x in packet.seeds if x.seed_id == s.seed_id).shape)])}) for s in signals]
            finished = []
            for s in signals:
                assert s.blueprint_name is not None
                outcome = (reward_for or {}).get(s.blueprint_name) or rng.choice(
                    [SeedState.FOSSILIZED, SeedState.CULLED, SeedState.ROLLED_BACK])
                finished.append(FieldReport(
                    seed_id=s.seed_id or "", blueprint_id=None, artifact_id=None, outcome=outcome,  # type: ignore
                    health_at_decision=0.1, metric_before=None, metric_after=None, epoch_started=epoch,
                    epoch_finished=epoch + 3, timeline=(StateChange(epoch=epoch, source=SeedState.DORMANT,
                                                                    target=SeedState.GERMINATED),)))
            rec.record(packet, signals, finished)  # (outcomes recorded early: only the join matters here)


def test_simic_learns_the_heuristic_from_the_replay_buffer(tmp_path: Path) -> None:
    urza = Urza.local(tmp_path / "urza")
    _fill_buffer(urza, runs=4, boundaries=40, seed=1)
    exps = load_experience(urza)
    assert len(exps) == 160 and sum(len(e.outcomes) for e in exps) == sum(len(e.record.signals) for e in exps)
    out = tmp_path / "urza" / "policies" / "p.safetensors"
    result = train_simic(urza, CFG, 2, SimicConfig(hidden=32, layers=2, epochs=40, beta=0.0), out=out)
    val = result.figures["val"]
    assert val["samples"] >= 40
    untrained = evaluate(_policy(_net(hidden=32)), exps)
    assert val["accuracy"] >= 0.85 > val["random_accuracy"] + 0.4, val
    assert val["accuracy"] > untrained["accuracy"] + 0.2, (val, untrained)
    assert load_policy(out)[1]["figures"]["val"]["accuracy"] == val["accuracy"]


def test_simic_advantage_weighting_prefers_the_blueprint_that_paid(tmp_path: Path) -> None:
    """The behaviour germinates every legal seed with a random blueprint; only squeeze_excitation fossilizes. Pure
    cloning spreads over the conv blueprints; AWR concentrates on the one that paid."""
    urza = Urza.local(tmp_path / "urza")
    paid = {"squeeze_excitation": SeedState.FOSSILIZED, "conv_bottleneck": SeedState.ROLLED_BACK,
            "attention": SeedState.CULLED, "low_rank_adapter": SeedState.CULLED, "residual_mlp": SeedState.CULLED}
    _fill_buffer(urza, runs=2, boundaries=50, seed=2, reward_for=paid, explore=True,
                 behaviour=PolicyConfig(health_threshold=1.0, confidence_threshold=0.0))
    exps = load_experience(urza)

    def share(beta: float) -> float:
        res = train_simic(urza, CFG, 2, SimicConfig(hidden=32, layers=2, epochs=30, beta=beta, val_fraction=0.01))
        pol, mass = _policy(res.net), []
        for e in exps:
            g, _, logits = pol.scores(e.record.packet)
            conv = g.legal & g.bp_legal[:, VOCAB.index("squeeze_excitation")]
            mass += torch.softmax(logits[conv], -1)[:, VOCAB.index("squeeze_excitation")].tolist()
        return sum(mass) / len(mass)

    bc, awr = share(0.0), share(0.5)  # p(squeeze_excitation) at the conv seeds
    assert bc < 0.5 and awr > 0.8, (bc, awr)


def _tiny(root: Path, *extra: str):
    return load(REPO / "configs/morph/tiny.toml", CONFIG_MODEL,
                [f"library.root={root}/urza", "train.checkpoint_every=2", "train.epochs=4", "data.limit=320", *extra])


def _assert_buffer_matches(urza: Urza, report: dict) -> None:
    rows = [rep.model_dump(mode="json") for run, rep in urza.meta.keyed_field_reports() if run == report["run_id"]]
    assert rows == report["field_reports"] and rows  # each outcome once, in order
    epochs = [json.loads(raw)["packet"]["epoch"] for run, raw in urza.meta.decisions() if run == report["run_id"]]
    assert epochs == list(range(1, report["epochs_done"] + 1))  # each boundary once


@pytest.mark.slow
def test_replay_buffer_has_no_duplicates_after_stop_resume_and_sigkill_resume(tmp_path: Path) -> None:
    from cambium.morph.train import train

    cfg = _tiny(tmp_path)
    first = train(cfg, name="stop", runs_root=tmp_path / "runs", stop_after=3, show_progress=False)
    report = train(cfg, name="stop", runs_root=tmp_path / "runs", resume=first["run_id"], show_progress=False)
    _assert_buffer_matches(Urza.local(tmp_path / "urza"), report)
    # SIGKILL right after boundary 3 is recorded; the last checkpoint is epoch 2's, so the resumed run records
    # boundary 3 (and its reports) a second time: the dedupe keys keep one copy.
    script = (
        "import os, signal, sys\n"
        "from cambium.morph import field_reports\n"
        "orig = field_reports.ReplayRecorder.record\n"
        "def record(self, packet, signals, finished):\n"
        "    orig(self, packet, signals, finished)\n"
        "    if packet.epoch == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "field_reports.ReplayRecorder.record = record\n"
        "from cambium.cli import main\n"
        "sys.argv = ['cambium'] + sys.argv[1:]\n"
        "main()\n"
    )
    runs = tmp_path / "killed"
    cmd = [sys.executable, "-c", script, "morph", "train", "--config", str(REPO / "configs/morph/tiny.toml"),
           "--runs-dir", str(runs), "--set", f"library.root={tmp_path}/urza", "--set", "train.checkpoint_every=2",
           "--set", "train.epochs=4", "--set", "data.limit=320"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir()]
    urza = Urza.local(tmp_path / "urza")
    recorded = [json.loads(raw)["packet"]["epoch"] for run, raw in urza.meta.decisions() if run == run_dir.name]
    assert recorded == [1, 2, 3]
    resumed = train(cfg, name="killed", runs_root=runs, resume=run_dir.name, show_progress=False)
    assert resumed["run_id"] == run_dir.name
    _assert_buffer_matches(urza, resumed)


def test_a_gnn_policy_loads_and_decides_over_http(tmp_path: Path) -> None:
    urza = Urza.local(tmp_path / "urza")
    net = _net()
    with torch.no_grad():
        net.germ[-1].bias.fill_(50.0)
    save_policy(tmp_path / "urza" / "policies" / "p.safetensors", net,
                {"hidden": 16, "layers": 2, "vocabulary": list(VOCAB)})
    (tmp_path / "outside.safetensors").write_bytes((tmp_path / "urza" / "policies" / "p.safetensors").read_bytes())
    packet = _packet(random.Random(4), 6)
    want = _policy(net).decide(packet)
    assert want
    with TestClient(create_app(urza, InProcessBus(), token=None)) as client:
        v = client.post("/policy/load", json={"kind": "gnn", "path": "policies/p.safetensors"})
        assert v.status_code == 200 and v.json()["kind"] == "gnn", v.text
        record = client.post("/step", content=packet.model_dump_json()).json()
        assert [parse(AdaptationSignal, s) for s in record["signals"]] == want
        assert all(s["kind"] == AdaptationKind.GERMINATE for s in record["signals"])
        analysis = client.post("/analyze", content=packet.model_dump_json()).json()
        assert analysis["signals"] == record["signals"] and set(analysis["seeds"]) == {s.seed_id for s in packet.seeds}
        status = client.get("/policy/status").json()
        assert status["kind"] == "gnn" and status["decisions"] == 1
        v2 = client.post("/policy/update", json={"max_adaptations_per_epoch": 0}).json()
        assert v2["kind"] == "gnn" and client.post("/step", content=packet.model_dump_json()).json()["signals"] == []
        raw = bytearray((tmp_path / "urza" / "policies" / "p.safetensors").read_bytes())
        raw[-1] ^= 1
        (tmp_path / "urza" / "policies" / "bad.safetensors").write_bytes(bytes(raw))
        for path, code, words in [("policies/bad.safetensors", 422, "modified or corrupted"),
                                  ("policies/none.safetensors", 404, "no policy file"),
                                  ("../outside.safetensors", 422, "inside the library root"),
                                  (str(tmp_path / "outside.safetensors"), 422, "inside the library root"),
                                  ("a\x00b", 422, "not a usable file name")]:
            r = client.post("/policy/load", json={"kind": "gnn", "path": path})
            assert r.status_code == code and words in r.json()["detail"] and "\n" not in r.json()["detail"], r.text
        assert client.get("/policy/version").json()["version"] == v2["version"]  # failed loads changed nothing


def test_a_run_with_controller_kind_gnn_decides_with_the_policy_file(tmp_path: Path) -> None:
    from cambium.morph.train import train

    net = _net()
    with torch.no_grad():
        net.germ[-1].bias.fill_(50.0)  # germinate wherever legal
        net.blueprint.bias.copy_(torch.tensor([20.0 if n == "squeeze_excitation" else 0.0 for n in VOCAB]))
    path = tmp_path / "p.safetensors"
    save_policy(path, net, {"hidden": 16, "layers": 2, "vocabulary": list(VOCAB)})
    cfg = _tiny(tmp_path, "train.epochs=2", "controller.kind=gnn", f"controller.policy={path}")
    report = train(cfg, name="gnn", runs_root=tmp_path / "runs", show_progress=False)
    firsts = [s["timeline"][0] for s in report["seeds"].values() if s["timeline"]]
    assert all(c["target"] == "GERMINATED" for c in firsts) and [c["epoch"] for c in firsts].count(1) == 2  # budget
    (rec,) = [json.loads(raw) for run, raw in Urza.local(tmp_path / "urza").meta.decisions()][:1]
    assert rec["policy"] == "gnn" and {s["blueprint_name"] for s in rec["signals"]} == {"squeeze_excitation"}
    missing = _tiny(tmp_path, "controller.kind=gnn", f"controller.policy={tmp_path / 'none.safetensors'}")
    with pytest.raises(ConfigError, match=r"^controller\.policy: policy file .* does not exist"):
        train(missing, name="gnn", runs_root=tmp_path / "runs-missing", show_progress=False)
    assert not (tmp_path / "runs-missing").exists()  # refused before a run was created


_dims = st.lists(st.one_of(st.integers(0, 4096), st.sampled_from(["B", "T"])), max_size=5).map(tuple)
_seeds = st.lists(st.builds(
    lambda loc, i, state, shape, emb, fail: Seed(seed_id=loc, index=i, location=loc, state=state, shape=shape,
                                                 embargo_until=emb, failures=fail),
    st.text("ab.0", max_size=12), st.integers(0, 10**6), st.sampled_from(list(SeedState)), _dims,
    st.integers(0, 20), st.integers(0, 10**6)), max_size=30)
_float = st.floats(-1e30, 1e30, allow_nan=False)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(seeds=_seeds, data=st.data())
def test_fuzzed_packets_get_legal_decisions_from_the_gnn(seeds: list[Seed], data: st.DataObject) -> None:
    health = tuple(HealthSignal(
        seed_id=s.seed_id, index=s.index, epoch=3, state=s.state, activation_mean=data.draw(_float),
        activation_variance=abs(data.draw(_float)), gradient_norm=abs(data.draw(_float)),
        dead_unit_ratio=data.draw(st.floats(0, 1)), health_score=data.draw(st.floats(0, 1)),
        confidence=data.draw(st.floats(0, 1)), samples=data.draw(st.integers(0, 10**9)),
    ) for s in seeds if data.draw(st.booleans()))
    packet = SystemStatePacket(epoch=data.draw(st.integers(0, 30)), step=1, train_loss=data.draw(_float),
                               health=health, seeds=tuple(seeds),
                               adaptations_this_epoch=data.draw(st.integers(0, 5)))
    net = _net()
    with torch.no_grad():
        net.germ[-1].bias.fill_(data.draw(st.floats(-20, 20)))
    signals = _policy(net, budget=3).decide(packet)
    assert len(signals) <= max(3 - packet.adaptations_this_epoch, 0)
    with_health = {h.seed_id for h in health}
    for s in signals:
        seed = next(x for x in seeds if x.seed_id == s.seed_id and x.state == SeedState.DORMANT
                    and packet.epoch >= x.embargo_until)
        assert s.seed_id in with_health and s.blueprint_name in LAYOUTS[len(seed.shape)]
