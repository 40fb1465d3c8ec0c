"""The MAG and SWA models: the MAG block is SWA(h) ⊙ σ(Memory(h)), context memory carries text across chunks while
SWA forgets it, inner-loop state never leaks out of a forward, and context memory round-trips through a state dict."""

from __future__ import annotations

import pytest
import torch

from cambium.core.config import load_data
from cambium.core.errors import CheckpointError
from cambium.nested.config import CONFIG_MODEL, ModelConfig
from cambium.nested.model import ContextMemory, NestedBlock, NestedLM

MEMORY = {"execution": "chunkwise_exact", "chunk_size": 8}


def model_cfg(composition: str = "mag", **extra: object) -> ModelConfig:
    data = {"vocab_size": 64, "dim": 32, "n_blocks": 2, "heads": 2, "mlp_hidden": 48, "window": 8,
            "composition": composition, **({"memory": MEMORY} if composition == "mag" else {}), **extra}
    cfg: ModelConfig = load_data({"model": data}, CONFIG_MODEL).model
    return cfg


def make(composition: str = "mag", seed: int = 0) -> NestedLM:
    torch.manual_seed(seed)
    model = NestedLM(model_cfg(composition), max_seq_len=32)
    with torch.no_grad():  # wider gates than the init, so that the memory visibly matters
        for block in model.blocks:
            if isinstance(block, NestedBlock) and block.memory is not None:
                for level in block.memory.levels:
                    level.gates.bias.view(3, -1)[2].fill_(1.0)
    return model


def test_mag_block_is_attention_gated_by_sigmoid_of_memory() -> None:
    model = make()
    block = model.blocks[0]
    assert isinstance(block, NestedBlock) and block.memory is not None
    x = torch.randn(2, 16, 32)
    h = block.norm1(x)
    m, _ = block.memory.levels[0](h)
    mid = x + block.attn(h) * torch.sigmoid(m)
    expected = mid + block.mlp(block.norm2(mid))
    out, state, _ = block(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert state is not None


def test_context_memory_carries_text_across_chunks_and_swa_does_not() -> None:
    tokens = torch.randint(0, 64, (2, 32))
    first, second = tokens[:, :16], tokens[:, 16:]
    other_first = torch.randint(0, 64, (2, 16))
    for composition in ("mag", "swa"):
        model = make(composition)
        _, states, _ = model(first)
        _, other_states, _ = model(other_first)
        after, _, _ = model(second, states)
        after_other, _, _ = model(second, other_states)
        if composition == "mag":
            assert (after - after_other).abs().max() > 1e-4  # what came before the chunk reaches it via memory
        else:
            assert all(s is None for s in states)
            torch.testing.assert_close(after, after_other, rtol=0, atol=0)  # attention sees the chunk only


def test_inner_loop_state_lives_only_inside_a_forward() -> None:
    model = make()
    tokens = torch.randint(0, 64, (2, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out1, s1, _ = model(tokens)
    out2, s2, _ = model(tokens)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    for a, b in zip(s1, s2, strict=True):
        assert a is not None and b is not None and a[0] is not None and b[0] is not None
        for p, q in zip(a[0].params, b[0].params, strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    after = model.state_dict()
    assert all(before[k].equal(after[k]) for k in before)  # parameters untouched by the inner loop


def test_context_memory_state_dict_round_trips_and_detaches() -> None:
    model = make()
    _, states, windows = model(torch.randint(0, 64, (3, 16)))
    memory = ContextMemory(2)
    memory.update(states, windows)
    assert all(b is not None and not any(p.requires_grad for s in b if s is not None for p in s.params)
               for b in memory.states)
    restored = ContextMemory(2)
    restored.load_state_dict(memory.state_dict())
    tokens = torch.randint(0, 64, (3, 16))
    for w, v in zip(restored.windows, memory.windows, strict=True):
        assert w is not None and v is not None and w.shape == (3, 7, 32) and w.equal(v)
    torch.testing.assert_close(model(tokens, restored.states, restored.windows)[0],
                               model(tokens, memory.states, memory.windows)[0], rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="2 blocks × 1 levels does not fit a model of 3 × 1"):
        ContextMemory(3).load_state_dict(memory.state_dict())


@pytest.mark.parametrize("composition", ["swa", "mag"])
def test_carried_attention_window_equals_attending_over_the_whole_sequence(composition: str) -> None:
    model = make(composition)
    tokens = torch.randint(0, 64, (2, 27))
    whole, _, _ = model(tokens)
    pieces, states, windows = [], None, None
    for start, stop in ((0, 5), (5, 16), (16, 27)):  # a first chunk shorter than the window, then longer ones
        logits, states, windows = model(tokens[:, start:stop], states, windows)
        pieces.append(logits)
    if composition == "swa":
        torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-5, atol=1e-5)
    else:  # the memory's chunkwise WY form splits differently: equal to fp32 rounding, not bitwise
        torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-4, atol=1e-4)
    assert windows is not None and all(w is not None and w.shape[1] == 7 for w in windows)
