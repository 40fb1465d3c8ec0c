"""cambium.morph: morphogenetic training — hosts that grow grafted blueprints where they need capacity (docs/morph.md).

Start at `wrap` (seed slots on any nn.Module), `tolaria.assemble` / `Tolaria` (the loop), `kasmina` (lifecycle and
safety), `lifecycle` (the transition table) and `contracts` (every message).
"""

from cambium.morph.wrap import MorphedModel, suggest_locations, wrap

__all__ = ["MorphedModel", "suggest_locations", "wrap"]
