"""The search's decision units: a layer, or layers a space ties together, with the configs each
can take; and the layers fixed in full precision (protected by the space, or fitting nothing)."""

from __future__ import annotations

import dataclasses

from .._errors import SpaceError
from ..backends import QuantConfig, full_precision
from ..models.inventory import Inventory, LayerInfo
from ..plans.patterns import PatternError
from .space import SearchSpace


@dataclasses.dataclass
class Group:
    name: str
    layers: list[LayerInfo]
    options: list[QuantConfig]

    @property
    def weight_params(self) -> int:
        return sum(l.weight_params for l in self.layers)

    def nbytes(self, cfg: QuantConfig) -> int:
        return sum(l.bytes if cfg.full_precision else l.nbytes(cfg) for l in self.layers)


@dataclasses.dataclass
class Groups:
    groups: list[Group]
    fixed: list[LayerInfo]  # kept in full precision whatever the plan
    components: list[str]

    @classmethod
    def build(cls, inv: Inventory, space: SearchSpace, components: list[str]) -> "Groups":
        """Raises SpaceError when the space does not fit the model: a component it lacks, a tie
        or protect entry that matches no layer (it would silently do nothing)."""
        problems = []
        present = {l.component for l in inv}
        for comp in components:
            if comp not in present:
                problems.append(f"components: this model has no component {comp!r} with Linear "
                                f"layers; it has {sorted(present)}")
        layers = [l for l in inv if l.component in components]
        names = [l.name for l in layers]
        protected: set[str] = set()
        ties: dict[str, str] = {}  # layer -> tied set, the first tie entry that matches wins
        try:
            for entry, pattern in zip(space.protect, space.protect_patterns):
                hits = pattern.matching(names)
                if not hits:
                    problems.append(f"protect: {entry!r} matches no layer of {components}")
                protected.update(name for name, _ in hits)
            for entry, pattern in zip(space.tie, space.tie_patterns):
                hits = pattern.matching(names)
                if not hits:
                    problems.append(f"tie: {entry!r} matches no layer of {components}")
                for name, m in hits:  # the groups, joined, name the set: "(blocks)\.\d+\.(.*)"
                    # ties one layer position across the blocks of one kind
                    ties.setdefault(name, "tie:" + "*".join(g or "" for g in m.groups()))
        except PatternError as e:
            problems.append(str(e))
        if problems:
            raise SpaceError(problems, space.name)
        fixed, by_key = [], {}
        for layer in layers:
            if layer.name in protected:
                fixed.append(layer)
            else:
                by_key.setdefault(ties.get(layer.name, layer.name), []).append(layer)
        groups = []
        for key, members in by_key.items():
            options = [c for c in space.candidates if all(l.fits(c) is None for l in members)]
            if any(not c.full_precision for c in options):
                groups.append(Group(key, members, options))
            else:
                fixed.extend(members)  # nothing but full precision fits
        return cls(groups, fixed, list(components))

    def plan(self, choice: list[int]) -> dict[str, QuantConfig]:
        """Every searched layer's config under ``choice`` (one option index per group)."""
        none = full_precision()
        out = {l.name: none for l in self.fixed}
        for g, k in zip(self.groups, choice):
            for l in g.layers:
                out[l.name] = g.options[k]
        return out

    def labels(self, choice: list[int]) -> dict[str, str]:
        """``{group: config label}``: a plan as Optuna parameters."""
        return {g.name: g.options[k].label for g, k in zip(self.groups, choice)}

    def choice(self, labels: dict[str, str]) -> list[int]:
        """Inverse of :meth:`labels`."""
        return [[c.label for c in g.options].index(labels[g.name]) for g in self.groups]
