"""The blueprints a seed location can take, and Tamiyo's GradMax choice among them (`policy.blueprint_choice`).

For an activation shape the catalog holds, once per shape:
- the library's template of every blueprint named in the policy's list for the layout (`policy.blueprints_conv`,
  `..._tokens`, `..._flat`);
- `library.mutants_per_blueprint` of Karn's mutants of each template (IR mutations within `library.max_params`,
  filed in Urza as PROPOSED; Karn's RNG is seeded by the run's seed, the shape and the template, so the same run
  always gets the same mutants, a resumed one included);
each compiled through Tezzeret with the run's compile settings (stored content-addressed, reused when already
there), loaded back through Urza (hash-verified) and tagged by Urabrask (speed, size, memory, risk:
`cambium.morph.kernel_bench`). A blueprint over `library.max_params` trainable parameters, one with a tag in
`policy.avoid_tags`, or one that fails to compile is never offered.

`Choices.rank(seed)` orders a seed's options: more `policy.prefer_tags` first, then the larger GradMax score
(`cambium.morph.growth`: ‖∇_θout L‖² from the activation and loss gradient its slot sampled in the last epoch),
then the list's order. A blueprint that already failed at the location comes after every other one. The kernel that
is scored is the one that will be grown: same IR, same compile settings and initialisation.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cambium.morph.compiler import Tezzeret, load_kernel
from cambium.morph.config import LibraryConfig, PolicyConfig
from cambium.morph.contracts import Blueprint, CompiledKernelArtifact, CompileSettings, Seed
from cambium.morph.growth import gradmax_score
from cambium.morph.ir import BlueprintError
from cambium.morph.kernel_bench import is_stateful, tags_for
from cambium.morph.library import Urza
from cambium.morph.mutate import Karn

__all__ = ["Catalog", "Choice", "Choices", "Option"]

log = logging.getLogger("cambium.morph.catalog")

Shape = tuple[int | str, ...]
Probe = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Option:
    """One blueprint a location can take, compiled, verified and tagged."""

    blueprint: Blueprint
    artifact: CompiledKernelArtifact
    tags: tuple[str, ...]
    kernel: nn.Module
    order: int
    """Position in the catalog (templates in the policy list's order, each followed by its mutants)."""


@dataclass(frozen=True)
class Choice:
    blueprint_id: str
    name: str
    score: float
    tags: tuple[str, ...]
    param_count: int


class Catalog:
    """Templates and Karn's mutants for each activation shape, compiled and tagged (built once per shape)."""

    def __init__(self, urza: Urza, tezzeret: Tezzeret, policy: PolicyConfig, library: LibraryConfig,
                 settings: CompileSettings, *, seed: int = 0) -> None:
        self.urza, self.tezzeret = urza, tezzeret
        self.policy, self.settings, self.seed = policy, settings, seed
        self.max_params, self.mutants = library.max_params, library.mutants_per_blueprint
        self.avoid, self.prefer = frozenset(policy.avoid_tags), frozenset(policy.prefer_tags)
        self._options: dict[Shape, list[Option]] = {}

    def names_for(self, shape: Shape) -> tuple[str, ...]:
        return {2: self.policy.blueprints_flat, 3: self.policy.blueprints_tokens,
                4: self.policy.blueprints_conv}.get(len(shape), ())

    def options(self, shape: Shape) -> list[Option]:
        shape = tuple(shape)
        if shape not in self._options:
            self._options[shape] = self._build(shape)
        return self._options[shape]

    def _build(self, shape: Shape) -> list[Option]:
        out: list[Option] = []
        seen: set[str] = set()
        for name in self.names_for(shape):
            try:
                template = self.urza.template(name, shape)
            except BlueprintError:
                continue
            family = [template]
            if self.mutants:
                key = f"{self.seed}/{name}/{list(shape)}".encode()
                karn = Karn(self.urza, seed=zlib.crc32(key), max_params=self.max_params)
                for _ in range(4 * self.mutants):
                    if len(family) > self.mutants:
                        break
                    mutant = karn.propose(template)
                    if mutant is not None and all(m.blueprint_id != mutant.blueprint_id for m in family):
                        family.append(mutant)
            for bp in family:
                if bp.blueprint_id in seen or bp.param_count > self.max_params:
                    continue
                seen.add(bp.blueprint_id)
                option = self._compile(bp, len(out))
                if option is not None and not self.avoid & set(option.tags):
                    out.append(option)
        return out

    def _compile(self, bp: Blueprint, order: int) -> Option | None:
        try:
            art = self.tezzeret.compile(bp.blueprint_id, self.settings)
            record, payload = self.urza.kernel(art.artifact_id)
            kernel = load_kernel(payload, record)
        except Exception as exc:  # a blueprint that does not compile or load is not offered
            log.warning("blueprint %s (%s) left out of the catalog: %s", bp.name, bp.blueprint_id[:12], exc)
            return None
        # Tags from the record's measurements and the kernel itself (a record stored by an older version may carry
        # fewer tag classes).
        tags = tags_for(record.latency_ms or 0.0, record.param_count, record.state_bytes + record.activation_bytes,
                        is_stateful(kernel))
        return Option(bp, record, tags, kernel, order)


class Choices:
    """Tamiyo's GradMax blueprint choice: `rank(seed)` → the seed's options, best first (see the module doc)."""

    def __init__(self, catalog: Catalog, probe_of: Callable[[str], Probe | None]) -> None:
        self.catalog = catalog
        self.probe_of = probe_of

    def rank(self, seed: Seed) -> list[Choice]:
        options = self.catalog.options(tuple(seed.shape))
        probe = self.probe_of(seed.seed_id)
        prefer = self.catalog.prefer
        scored = []
        for o in options:
            score = gradmax_score(o.kernel, *probe) if probe is not None else 0.0
            score = score if math.isfinite(score) else 0.0
            failed = seed.failures > 0 and o.blueprint.blueprint_id == seed.blueprint_id
            scored.append(((failed, -len(prefer & set(o.tags)), -score, o.order), o, score))
        scored.sort(key=lambda t: t[0])
        return [Choice(o.blueprint.blueprint_id, o.blueprint.name, score, o.tags, o.blueprint.param_count)
                for _, o, score in scored]
