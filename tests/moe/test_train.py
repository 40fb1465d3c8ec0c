"""The MoE trainer on the committed text: it learns, logs MOE-10 diagnostics, samples and resumes exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from cambium.core.config import load
from cambium.core.metrics import read_metrics
from cambium.core.testing import check_exact_resume
from cambium.data.mixture import prepare_mixture
from cambium.moe.config import MoEConfig
from cambium.moe.sample import sample_text
from cambium.moe.train import build_optim, train

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "moe" / "tiny.toml"


@pytest.fixture(scope="module")
def mixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("moe") / "mixture"
    cfg = load(TINY, MoEConfig, [f"data.mixture.out_dir={out}"])
    prepare_mixture(cfg.data.mixture)
    return out


def tiny(mixture_dir: Path, *extra: str) -> MoEConfig:
    return load(TINY, MoEConfig, [f"data.mixture.out_dir={mixture_dir}", "train.max_steps=30", "train.eval_every=15",
                                  "train.checkpoint_every=10", "train.expert_stats_every=5", *extra])


def test_tiny_learns_and_logs_diagnostics(mixture_dir: Path, tmp_path: Path) -> None:
    cfg = tiny(mixture_dir)
    result = train(cfg, tmp_path / "runs", show_progress=False, measure_peak=False)
    rows = read_metrics(result.run_dir / "metrics.duckdb")
    by_name: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        by_name.setdefault(r.name, []).append((r.step, r.value))
    loss = [v for _, v in sorted(by_name["lm_loss"])]
    assert len(loss) == 30 and sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.3  # it learns
    n_moe = cfg.model.n_layers - cfg.model.n_dense_layers
    for layer in range(n_moe):
        assert f"moe/l{layer}/max_over_mean" in by_name and f"moe/l{layer}/router_entropy" in by_name
        loads = [v for n, vals in by_name.items() if n.startswith(f"moe/l{layer}/load/") for s, v in vals if s == 30]
        assert len(loads) == cfg.model.moe.n_routed_experts and sum(loads) == pytest.approx(1.0)
    assert {"val/loss", "val/bpb", "val/shakespeare/bpb", "lr/dense_matrix", "lr/expert"} <= set(by_name)
    assert [s for s, _ in by_name["val/loss"]] == [15, 30]
    # The aux-loss-free bias moves by ±γ per step from zero and stays centred.
    biases = [v for n, vals in by_name.items() if n.startswith("moe/l0/bias/") for s, v in vals if s == 30]
    assert abs(sum(biases)) < 1e-5 and max(abs(b) for b in biases) > 0
    assert max(abs(b) for b in biases) <= 30 * cfg.model.moe.bias_update_rate * 2 + 1e-6
    text = sample_text(tmp_path / "runs", result.run_id, "ROMEO:", 20, seed=1)
    assert text == sample_text(tmp_path / "runs", result.run_id, "ROMEO:", 20, seed=1) and len(text) > 0


def test_param_groups_split_by_kind(mixture_dir: Path) -> None:
    from cambium.moe.train import build_model

    cfg = tiny(mixture_dir)
    model = build_model(cfg)
    opt = build_optim(cfg, model)
    names = {g["name"]: set(g["param_names"]) for g in opt.param_groups}
    assert all(".router." in n for n in names["router"]) and all(n.endswith(("w13", "w2")) for n in names["expert"])
    assert names["embedding"] == {"embed.weight"}
    assert all(model.get_parameter(n).ndim == 2 for n in names["dense_matrix"])
    assert opt.kinds[[g["name"] for g in opt.param_groups].index("dense_matrix")] == "muon"
    assert sum(len(v) for v in names.values()) == len(list(model.parameters()))
    assert opt.kinds[[g["name"] for g in opt.param_groups].index("expert")] == "adamw"
    with_experts = build_optim(tiny(mixture_dir, "optim.muon_experts=true"), model)
    assert with_experts.kinds[[g["name"] for g in with_experts.param_groups].index("expert")] == "muon"
    loss = model(torch.randint(0, 512, (2, 16))).logits.square().mean()
    loss.backward()
    before = model.blocks[1].ffn.w13.detach().clone()
    with_experts.step()
    assert not torch.equal(before, model.blocks[1].ffn.w13)


def test_sigkill_and_resume_give_bitwise_identical_metrics(mixture_dir: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "cambium.cli", "moe", "train", "--config", str(TINY), "--runs-dir", str(runs),
               "--no-prep", "--set", f"data.mixture.out_dir={mixture_dir}", "--set", "train.max_steps=12",
               "--set", "train.checkpoint_every=3", "--set", "train.eval_every=6", "--set", "train.eval_windows=2",
               "--set", "train.threads=1"]
    report = check_exact_resume(command, runs_root=runs, n_steps=12, seed=5, cwd=REPO)
    assert report.ok, report.summary()


def test_resume_extends_a_finished_run_and_refuses_a_changed_model(mixture_dir: Path, tmp_path: Path) -> None:
    from cambium.core.errors import ConfigError
    from cambium.core.runs import get_run

    runs = tmp_path / "runs"
    first = train(tiny(mixture_dir, "train.max_steps=10", "train.threads=1"), runs, show_progress=False,
                  measure_peak=False)
    before = [(r.step, r.name, r.value) for r in read_metrics(first.run_dir / "metrics.duckdb")
              if not r.name.startswith("perf/")]
    with pytest.raises(ConfigError, match=r"model\.dim"):
        train(tiny(mixture_dir, "train.max_steps=10", "train.threads=1", "model.dim=96"), runs, resume=first.run_id,
              show_progress=False, measure_peak=False)
    assert get_run(runs, first.run_id).status == "finished"  # a refused resume leaves the run as it was
    longer = train(tiny(mixture_dir, "train.max_steps=14", "train.threads=1"), runs, resume=first.run_id,
                   show_progress=False, measure_peak=False)
    rows = [(r.step, r.name, r.value) for r in read_metrics(first.run_dir / "metrics.duckdb")
            if not r.name.startswith("perf/")]
    assert longer.steps == 14 and max(s for s, _, _ in rows) == 14
    assert [r for r in rows if r[0] <= 10 and not r[1].startswith("val/")] == [
        r for r in before if not r[1].startswith("val/")]
    assert get_run(runs, first.run_id).status == "finished"
    assert load(first.run_dir / "config.toml", MoEConfig).train.max_steps == 14


def test_resume_refuses_a_checkpoint_of_another_config_before_loading_it(mixture_dir: Path, tmp_path: Path) -> None:
    from cambium.core.errors import CheckpointError
    from cambium.core.loop import DeviceContext, Session
    from cambium.core.progress import ProgressReporter
    from cambium.core.runs import open_run
    from cambium.moe.train import MoETask

    cfg = tiny(mixture_dir, "train.max_steps=10")
    result = train(cfg, tmp_path / "runs", show_progress=False, measure_peak=False)
    # A session opened by hand skips the run's config check, so the checkpoint's own fingerprint is what stops this;
    # a wider model would otherwise fail inside load_state_dict on tensor shapes.
    wide = tiny(mixture_dir, "train.max_steps=10", "model.dim=96")
    device = DeviceContext(torch.device("cpu"))
    with Session(wide, wide.train, open_run(tmp_path / "runs", result.run_id), resumed=True, device=device,
                 reporter=ProgressReporter(None), show_progress=False, peak=None) as session, \
            pytest.raises(CheckpointError, match="another config"):
        session.fit(MoETask(wide, device))


def _tamper_cursor(ckpt: Path, edit: object) -> None:
    """Edit a checkpoint's cursor.json and re-sign it in meta.json (as a deliberate tamperer would)."""
    import json

    from cambium.core.files import file_sha256

    cursor_path = ckpt / "cursor.json"
    cursor = json.loads(cursor_path.read_text())
    edit(cursor)  # type: ignore[operator]
    cursor_path.write_text(json.dumps(cursor))
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["cursor.json"] = {"bytes": cursor_path.stat().st_size, "sha256": file_sha256(cursor_path)}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_a_tampered_cursor_json_is_one_checkpoint_error_naming_the_file_and_key(mixture_dir: Path,
                                                                               tmp_path: Path) -> None:
    from cambium.core.errors import CheckpointError

    cfg = tiny(mixture_dir, "train.max_steps=10", "train.eval_every=100")
    result = train(cfg, tmp_path / "runs", show_progress=False, measure_peak=False)
    ckpt = sorted((result.run_dir / "checkpoints").glob("step_*"))[-1]

    def far_position(cursor: dict) -> None:  # type: ignore[type-arg]
        for dataset in cursor["task"]["loader"]["datasets"].values():
            dataset["position"] = 10**12

    _tamper_cursor(ckpt, far_position)
    longer = tiny(mixture_dir, "train.max_steps=12", "train.eval_every=100")
    with pytest.raises(CheckpointError, match=r"cursor\.json: data cursor: datasets\.\w+: position=1000000000000"):
        train(longer, tmp_path / "runs", resume=result.run_id, show_progress=False, measure_peak=False)
    _tamper_cursor(ckpt, lambda cursor: cursor.update(loop_step="ten"))
    with pytest.raises(CheckpointError, match=r"cursor\.json: loop_step='ten'"):
        train(longer, tmp_path / "runs", resume=result.run_id, show_progress=False, measure_peak=False)


def test_a_non_utf8_prompt_is_one_line(tmp_path: Path) -> None:
    from cambium.core.errors import DataError

    prompt = b"ROMEO\xff:".decode("utf-8", "surrogateescape")  # how Python hands over non-UTF-8 argv bytes
    with pytest.raises(DataError, match="--prompt is not UTF-8 text \\(byte 0xff at character 5\\)"):
        sample_text(tmp_path / "runs", "no-such-run", prompt, 5)


def test_an_integer_beyond_int64_is_refused_when_the_config_is_loaded() -> None:
    from cambium.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.dim=99999999999999999999999: integer out of range"):
        load(TINY, MoEConfig, ["model.dim=99999999999999999999999"])


def test_train_cli_rebuilds_stale_data_for_a_new_run_and_refuses_it_on_resume(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cambium.core.errors import DataError
    from cambium.moe.cli import app

    source = tmp_path / "corpus.txt"
    source.write_text((REPO / "data/samples/text/tinyshakespeare/input.txt").read_text()[:200_000])
    toml = tmp_path / "tiny.toml"
    text = TINY.read_text()
    toml.write_text(text)
    sets = [f"data.mixture.out_dir={tmp_path / 'mix'}", f"data.mixture.datasets=[{{name = 'shakespeare', path = "
            f"'{source}', val_fraction = 0.1}}]", "train.max_steps=2", "train.eval_every=100", "train.threads=1"]
    args = ["train", "--config", str(toml), "--runs-dir", str(tmp_path / "runs"), "--no-prep"]
    cli = CliRunner()
    for s in sets:
        args += ["--set", s]
    first = cli.invoke(app, [a for a in args if a != "--no-prep"])
    assert first.exit_code == 0, first.output
    from cambium.core.runs import list_runs

    (run_id,) = [r.id for r in list_runs(tmp_path / "runs")]
    with source.open("a") as fh:
        fh.write("\nNEW LINES NEVER TOKENIZED\n")
    resumed = cli.invoke(app, ["train", "--runs-dir", str(tmp_path / "runs"), "--resume", run_id,
                               "--set", "train.max_steps=3"])
    assert isinstance(resumed.exception, DataError), resumed.output
    assert "prepared data is stale" in str(resumed.exception) and "prep-mixture" in str(resumed.exception)
    fresh = cli.invoke(app, [a for a in args if a != "--no-prep"])
    assert fresh.exit_code == 0, fresh.output


def test_the_sharded_state_is_part_of_the_checkpoint_and_hashed(mixture_dir: Path, tmp_path: Path) -> None:
    """`shards/` (torch.distributed.checkpoint files) is listed in meta.json: a damaged shard fails verification
    and the checkpoint is not resumed from."""
    from cambium.core.checkpoint import latest_checkpoint, verify_checkpoint
    from cambium.core.errors import CheckpointError

    cfg = tiny(mixture_dir, "train.max_steps=2", "train.eval_every=100", "train.checkpoint_every=1")
    result = train(cfg, tmp_path / "runs", show_progress=False, measure_peak=False)
    ckpt = latest_checkpoint(result.run_dir / "checkpoints")
    assert ckpt is not None and ckpt.name == "step_00000002"
    meta = verify_checkpoint(ckpt)
    assert {"shards/.metadata", "shards/__0_0.distcp", "optimizer_groups.pt", "scheduler.pt"} <= set(meta["files"])
    assert "model.pt" not in meta["files"]
    shard = ckpt / "shards" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"shards/__0_0\.distcp does not match its sha256"):
        verify_checkpoint(ckpt)
    assert latest_checkpoint(result.run_dir / "checkpoints").name == "step_00000001"  # type: ignore[union-attr]
