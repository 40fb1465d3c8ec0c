"""The MAG and SWA models: the MAG block is SWA(h) ⊙ σ(Memory(h)), context memory carries text across chunks while
SWA forgets it, inner-loop state never leaks out of a forward, and context memory round-trips through a state dict."""

from __future__ import annotations

import pytest
import torch

from cambium.core.config import load_data
from cambium.core.errors import CheckpointError, ConfigError
from cambium.nested.config import CONFIG_MODEL, ModelConfig
from cambium.nested.model import ContextMemory, NestedLM

MEMORY = {"execution": "chunkwise_exact", "chunk_size": 8}


def model_cfg(composition: str = "mag", **extra: object) -> ModelConfig:
    data = {"vocab_size": 64, "dim": 32, "n_levels": 2, "heads": 2, "mlp_hidden": 48, "window": 8,
            "composition": composition, "memory": MEMORY, **extra}
    cfg: ModelConfig = load_data({"model": data}, CONFIG_MODEL).model
    return cfg


def make(composition: str = "mag", seed: int = 0) -> NestedLM:
    torch.manual_seed(seed)
    model = NestedLM(model_cfg(composition), max_seq_len=32)
    with torch.no_grad():  # wider gates than the init, so that the memory visibly matters
        for level in model.levels:
            if level.memory is not None:
                level.memory.gates.bias.view(3, -1)[2].fill_(1.0)
    return model


def test_mag_block_is_attention_gated_by_sigmoid_of_memory() -> None:
    model = make()
    level = model.levels[0]
    assert level.memory is not None
    x = torch.randn(2, 16, 32)
    h = level.norm1(x)
    m, _ = level.memory(h)
    mid = x + level.attn(h) * torch.sigmoid(m)
    expected = mid + level.mlp(level.norm2(mid))
    out, state = level(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert state is not None


def test_context_memory_carries_text_across_chunks_and_swa_does_not() -> None:
    tokens = torch.randint(0, 64, (2, 32))
    first, second = tokens[:, :16], tokens[:, 16:]
    other_first = torch.randint(0, 64, (2, 16))
    for composition in ("mag", "swa"):
        model = make(composition)
        _, states = model(first)
        _, other_states = model(other_first)
        after, _ = model(second, states)
        after_other, _ = model(second, other_states)
        if composition == "mag":
            assert (after - after_other).abs().max() > 1e-4  # what came before the chunk reaches it via memory
        else:
            assert all(s is None for s in states)
            torch.testing.assert_close(after, after_other, rtol=0, atol=0)  # attention sees the chunk only


def test_inner_loop_state_lives_only_inside_a_forward() -> None:
    model = make()
    tokens = torch.randint(0, 64, (2, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out1, s1 = model(tokens)
    out2, s2 = model(tokens)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    for a, b in zip(s1, s2, strict=True):
        assert a is not None and b is not None
        for p, q in zip(a.params, b.params, strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    after = model.state_dict()
    assert all(before[k].equal(after[k]) for k in before)  # parameters untouched by the inner loop


def test_context_memory_state_dict_round_trips_and_detaches() -> None:
    model = make()
    _, states = model(torch.randint(0, 64, (3, 16)))
    memory = ContextMemory(2)
    memory.update(states)
    assert all(s is not None and not any(p.requires_grad for p in s.params) for s in memory.states)
    restored = ContextMemory(2)
    restored.load_state_dict(memory.state_dict())
    tokens = torch.randint(0, 64, (3, 16))
    torch.testing.assert_close(model(tokens, restored.states)[0], model(tokens, memory.states)[0], rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="2 levels does not fit a model of 3"):
        ContextMemory(3).load_state_dict(memory.state_dict())


def test_unbuilt_compositions_are_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="composition='mal'"):
        NestedLM(model_cfg("mal"), 32)
    with pytest.raises(ConfigError, match="persistent_tokens=4"):
        NestedLM(model_cfg("mag", persistent_tokens=4), 32)
