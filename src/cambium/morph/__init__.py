"""cambium.morph: morphogenetic training — hosts that grow grafted blueprints where they need capacity (docs/morph.md).

Start at `wrap` (seed slots on any nn.Module), `loop.assemble` / `Tolaria` (the epoch loop), `seeds` (`Kasmina`, the
seed manager: lifecycle and safety), `lifecycle` (the transition table) and `contracts` (every message). docs/morph.md's
glossary maps the origin design's names to files.
"""

from cambium.morph.wrap import MorphedModel, suggest_locations, wrap

__all__ = ["MorphedModel", "suggest_locations", "wrap"]
