"""Test-time memory rules (MIRAS): memories whose forward pass is an inner optimisation loop.

Four composable knobs (`knobs.py`, validated in `config.py`): structure (vector, matrix, 2-layer MLP), attentional
bias (l2, dot-product, Huber, ℓp), retention (l2 decay, KL, elastic net, sphere), algorithm (gd, momentum,
Newton–Schulz, FTRL); the named rules are presets (`presets.py`). Execution paths: the token-by-token recurrences (the
references, `rules.py` and `delta.py`, which import no fast path), the exact chunkwise delta rule (WY form,
`delta_kernel.py`) and the chunk-start-gradient approximation (`chunk_approx.py`); `dispatch.py` runs a config on its
configured path. Kernel pairs with analytic backward: `delta_kernel.py`, `linear_memory.py`. `layer.py` wraps any rule
with projections and gates. Shapes: q, k `[B, H, T, Dk]`, v `[B, H, T, Dv]`, gates `[B, H, T]`; the inner loop is
fp32 under any autocast.
"""

from cambium.nn.memory.config import MemoryConfig
from cambium.nn.memory.delta import delta_rule_recurrent
from cambium.nn.memory.delta_kernel import delta_rule_chunkwise
from cambium.nn.memory.dispatch import memory_forward
from cambium.nn.memory.layer import MemoryLayer, TitansMemory
from cambium.nn.memory.linear_memory import linear_memory_fused, linear_memory_recurrent
from cambium.nn.memory.presets import PRESETS
from cambium.nn.memory.rules import MemoryState, initial_state, miras_recurrent, trellis_recurrent

__all__ = [
    "PRESETS",
    "MemoryConfig",
    "MemoryLayer",
    "MemoryState",
    "TitansMemory",
    "delta_rule_chunkwise",
    "delta_rule_recurrent",
    "initial_state",
    "linear_memory_fused",
    "linear_memory_recurrent",
    "memory_forward",
    "miras_recurrent",
    "trellis_recurrent",
]
