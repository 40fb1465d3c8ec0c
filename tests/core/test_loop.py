"""The core loop's pieces that need no system: device resolution, resume-safe config changes, the task contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import Field

from cambium.core.config import RESUME_SAFE, ConfigModel, changed_keys, is_resume_safe, load_data, resume_fingerprint
from cambium.core.distributed import DistInfo
from cambium.core.errors import ConfigError
from cambium.core.loop import DeviceContext, LoopConfig, Task, resolve_device

REPO = Path(__file__).resolve().parents[2]


class _Model(ConfigModel):
    width: int = Field(8, description="a model key")


class _Root(ConfigModel):
    model: _Model = Field(default_factory=_Model, description="model")
    train: LoopConfig = Field(default_factory=LoopConfig, description="loop")
    extra: _Model = Field(default_factory=_Model, description="a whole table marked safe",
                          json_schema_extra=RESUME_SAFE)


def test_auto_and_cpu_resolve_and_cuda_without_cuda_is_an_error() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        for spec in ("cuda", "cuda:1"):
            with pytest.raises(ConfigError, match="no CUDA device"):
                resolve_device(spec)
    with pytest.raises(ConfigError, match="must be 'auto'"):
        resolve_device("gpu")
    with pytest.raises(ConfigError, match=r"train\.device"):
        load_data({"train": {"device": "tpu"}}, _Root)


def test_changed_keys_and_which_a_resume_may_change() -> None:
    old = load_data({}, _Root)
    new = load_data({"model": {"width": 16}, "train": {"max_steps": 9, "eval_every": 3}, "extra": {"width": 2}}, _Root)
    assert changed_keys(old, new) == ["extra.width", "model.width", "train.eval_every", "train.max_steps"]
    assert [k for k in changed_keys(old, new) if not is_resume_safe(_Root, k)] == ["model.width"]
    assert not is_resume_safe(_Root, "train.seed") and not is_resume_safe(_Root, "train.dtype")
    safe_only = load_data({"train": {"max_steps": 9, "device": "cpu", "threads": 1}, "extra": {"width": 3}}, _Root)
    assert resume_fingerprint(safe_only) == resume_fingerprint(old)
    assert resume_fingerprint(new) != resume_fingerprint(old)


def test_a_task_without_data_parallel_support_refuses_it() -> None:
    task = Task()
    with pytest.raises(ConfigError, match="does not run data parallel"):
        task.parallelize(DistInfo(0, 2, 0, "gloo", torch.device("cpu")))


def test_device_context_moves_tensors_and_autocasts_in_bf16_only() -> None:
    ctx = DeviceContext(torch.device("cpu"))
    x = torch.ones(2)
    assert ctx.to(x) is x
    with ctx.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with DeviceContext(torch.device("cpu"), "bfloat16").autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("command", [["moe", "train"], ["nested", "build"], ["worldmodel", "pipeline"],
                                     ["morph", "train"]])
def test_device_cuda_without_cuda_fails_with_one_line(command: list[str], tmp_path: Path) -> None:
    system = command[0]
    proc = subprocess.run([sys.executable, "-m", "cambium.cli", *command, "--config",
                           str(REPO / "configs" / system / "tiny.toml"), "--runs-dir", str(tmp_path), "--device",
                           "cuda"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    reason = "CPU only" if system == "morph" else "no CUDA device"
    assert len(errors) == 1 and reason in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir()) or not any(p.is_dir() for p in tmp_path.iterdir())  # no run was created


def test_count_training_flops_counts_a_copy_and_leaves_model_and_rng_alone() -> None:
    from cambium.core.loop import count_training_flops

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False), torch.nn.Dropout(0.5))
    weight = model[0].weight.detach().clone()
    x = torch.randn(16, 8)
    state = torch.get_rng_state()
    flops = count_training_flops(model, lambda m: m(x).square().sum())
    # forward 2·16·8·4, backward only the weight's gradient (the input needs none): the same again
    assert flops == 2 * (2 * 16 * 8 * 4)
    assert torch.equal(torch.get_rng_state(), state)  # dropout in the probe drew from a forked RNG
    assert model[0].weight.grad is None and torch.equal(model[0].weight, weight)
