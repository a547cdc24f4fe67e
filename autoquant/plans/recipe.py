"""Recipes: plain, versioned YAML that says how to quantize each layer of a pipeline.

```yaml
format: autoquant-recipe/1
default: {method: hqq, bits: 4, group_size: 64}      # optional
layers:
  transformer.transformer_blocks.0.attn.to_q: {method: hqq, bits: 3, group_size: 64}
  "re:transformer\\.single_transformer_blocks\\.\\d+\\.proj_out": {method: bnb, bits: 4, type: nf4}
  transformer.proj_out: {method: none}
```

Which config a layer gets (precedence):
1. an entry whose key is the layer's exact name;
2. else the first ``re:`` entry, in file order, whose regex matches the whole name (``re.fullmatch``);
3. else ``default``, if present, for layers of the components in ``components`` (all when absent);
   a layer that cannot take the default (e.g. in_features not divisible by its group size) stays
   as it is and is listed in the apply summary under ``skipped``;
4. else the layer stays as it is.

An exact name or regex that matches no layer, or names a layer that cannot take its config, is an
error. Loading checks everything that needs no model; :meth:`Recipe.resolve` checks the rest
against a model's inventory, and both report every offending entry at once (the first
20 of them, and how many more). Keys follow :mod:`autoquant.plans.patterns`.

A recipe is untrusted data: the file is read within :mod:`autoquant.plans.strict_yaml`'s limits (size,
nesting, no aliases, no repeated keys), holds at most ``MAX_LAYER_ENTRIES`` layer entries of
which at most ``MAX_REGEX_ENTRIES`` are regexes, and matching all its regexes against a model's
layer names may take at most ``REGEX_SECONDS`` -- loading one is bounded in time and memory
whatever it holds.
"""

from __future__ import annotations

import dataclasses
import difflib
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

from .._errors import ConfigError, RecipeError
from ..backends import QuantConfig, config_from_dict
from ..models.inventory import Inventory, LayerInfo
from . import strict_yaml as _yaml
from .patterns import MATCH_SECONDS, REGEX_PREFIX, PatternError, parse_pattern

FORMAT = "autoquant-recipe/1"
_TOP_KEYS = ("format", "model", "components", "default", "layers", "budget", "metrics",
             "provenance")
_MODEL_KEYS = ("id", "revision", "fingerprint", "dtype")
MAX_LAYER_ENTRIES = 20_000
MAX_REGEX_ENTRIES = 256
REGEX_SECONDS = 5.0
#: unknown names get a "did you mean" hint only for the first few (difflib is slow)
_HINTS = 5


@dataclasses.dataclass
class Recipe:
    layers: dict[str, QuantConfig] = dataclasses.field(default_factory=dict)
    default: QuantConfig | None = None
    components: list[str] | None = None
    model: dict[str, Any] | None = None
    budget: Any = None
    metrics: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None

    # -- plain data ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data; what a reader wants first (model, budget, metrics, provenance) comes
        before the layer entries."""
        out: dict[str, Any] = {"format": FORMAT}
        if self.model is not None:
            out["model"] = dict(self.model)
        if self.components is not None:
            out["components"] = list(self.components)
        for key in ("budget", "metrics", "provenance"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.default is not None:
            out["default"] = self.default.to_dict()
        out["layers"] = {k: v.to_dict() for k, v in self.layers.items()}
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> "Recipe":
        """Validate and build. Raises RecipeError listing every problem."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe is a mapping with 'format: {FORMAT}', got "
                              f"{type(data).__name__}", source)
        problems: list[str] = []
        unknown = [k for k in data if k not in _TOP_KEYS]
        if unknown:
            problems.append(f"unknown top-level key(s) {unknown}; allowed: {list(_TOP_KEYS)}")
        if data.get("format") != FORMAT:
            problems.append(f"format must be {FORMAT!r}, got {data.get('format')!r}")

        model = data.get("model")
        if model is not None:
            if not isinstance(model, Mapping):
                problems.append("model must be a mapping (id, revision, fingerprint, dtype)")
                model = None
            else:
                bad = [k for k in model if k not in _MODEL_KEYS]
                if bad:
                    problems.append(f"model: unknown key(s) {bad}; allowed: {list(_MODEL_KEYS)}")
                model = dict(model)

        components = data.get("components")
        if components is not None and (not isinstance(components, list) or
                                       not all(isinstance(c, str) for c in components)):
            problems.append(f"components must be a list of component names, got {components!r}")
            components = None

        default = None
        if data.get("default") is not None:
            try:
                default = config_from_dict(data["default"])
            except ConfigError as e:
                problems.append(f"default: {e}")

        layers: dict[str, QuantConfig] = {}
        raw_layers = data.get("layers", {}) or {}
        if not isinstance(raw_layers, Mapping):
            problems.append("layers must be a mapping of layer name (or 're:' regex) to config")
            raw_layers = {}
        regexes = sum(1 for k in raw_layers if isinstance(k, str) and k.startswith(REGEX_PREFIX))
        if len(raw_layers) > MAX_LAYER_ENTRIES or regexes > MAX_REGEX_ENTRIES:
            raise RecipeError(f"{len(raw_layers):,} layer entries ({regexes:,} regexes): a recipe "
                              f"may hold at most {MAX_LAYER_ENTRIES:,} entries, "
                              f"{MAX_REGEX_ENTRIES} of them regexes", source)
        for key, entry in raw_layers.items():
            try:
                parse_pattern(key)
            except PatternError as e:
                problems.append(f"{_shown(key)}: {e}")
                continue
            try:
                layers[key] = config_from_dict(entry)
            except ConfigError as e:
                problems.append(f"{key}: {e}")

        for key in ("metrics", "provenance"):
            if data.get(key) is not None and not isinstance(data[key], Mapping):
                problems.append(f"{key} must be a mapping")
        if problems:
            raise RecipeError(problems, source)
        return cls(layers=layers, default=default, components=components, model=model,
                   budget=data.get("budget"), metrics=_plain(data.get("metrics")),
                   provenance=_plain(data.get("provenance")))

    def to_yaml(self) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)
        return (f"# autoquant recipe: apply with `autoquant apply --model MODEL --recipe FILE` or "
                f"autoquant.apply_recipe\n{text}")

    def save(self, path: str | Path) -> Path:
        """Write the recipe to ``path`` atomically: a failed write keeps the old file."""
        from .. import _atomic

        return _atomic.write_text(Path(path), self.to_yaml())

    # -- against a model ----------------------------------------------------------------------
    def resolve(self, inv: Inventory) -> "Plan":
        """The config of every layer this recipe touches. Raises RecipeError listing every
        entry that does not fit the model (unknown name, regex matching nothing, wrong shape,
        fingerprint mismatch, unknown component)."""
        problems: list[str] = []
        if self.model and self.model.get("fingerprint") and \
                self.model["fingerprint"] != inv.fingerprint():
            problems.append(
                f"model fingerprint {self.model['fingerprint']} does not match this model's "
                f"{inv.fingerprint()} (layer names or shapes differ): the recipe was made for "
                f"{self.model.get('id', 'another model')}")
        known_components = {layer.component for layer in inv}
        for comp in self.components or []:
            if comp not in known_components:
                problems.append(f"components: no component {comp!r}; this model has "
                                f"{sorted(known_components)}")

        names = [layer.name for layer in inv]
        exact = {k: v for k, v in self.layers.items() if not k.startswith(REGEX_PREFIX)}
        unknown = [key for key in exact if key not in inv]
        for i, key in enumerate(unknown):
            close = difflib.get_close_matches(key, names, n=1) if i < _HINTS else []
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{key}: no such quantizable layer{hint}")
        # every regex against every name, within one time budget; the first in file order wins
        regexes: list[tuple[str, set[str], QuantConfig]] = []
        deadline = time.monotonic() + REGEX_SECONDS
        for key, cfg in self.layers.items():
            if key.startswith(REGEX_PREFIX):
                try:
                    hits = parse_pattern(key).matching(
                        names, min(MATCH_SECONDS, deadline - time.monotonic()))
                except PatternError as e:
                    raise RecipeError(str(e)) from None
                regexes.append((key, {name for name, _ in hits}, cfg))
        assigned: dict[str, QuantConfig] = {}
        skipped: dict[str, str] = {}
        default_scope = set(self.components) if self.components is not None else None
        for layer in inv:
            cfg, key = exact.get(layer.name), layer.name
            if cfg is None:
                cfg, key = next(((rcfg, rkey) for rkey, hits, rcfg in regexes
                                 if layer.name in hits), (None, key))
            if cfg is not None:
                reason = layer.fits(cfg)
                if reason:
                    problems.append(f"{key}: layer {layer.name} [{layer.out_features}x"
                                    f"{layer.in_features}] cannot take {cfg.label}: {reason}")
                else:
                    assigned[layer.name] = cfg
            elif self.default is not None and (default_scope is None or
                                               layer.component in default_scope):
                reason = layer.fits(self.default)
                if reason:
                    skipped[layer.name] = f"{self.default.label}: {reason}"
                else:
                    assigned[layer.name] = self.default
        for rkey, hits, _ in regexes:
            # a regex shadowed by exact names or earlier regexes is fine; one matching nothing is not
            if not hits:
                problems.append(f"{rkey}: regex matches no quantizable layer")
        if problems:
            raise RecipeError(problems)
        return Plan(configs=assigned, skipped=skipped, inventory=inv)


@dataclasses.dataclass
class Plan:
    """A recipe resolved against one model: the config of each layer it quantizes."""

    configs: dict[str, QuantConfig]
    skipped: dict[str, str]
    inventory: Inventory

    def items(self) -> list[tuple[LayerInfo, QuantConfig]]:
        return [(self.inventory[name], cfg) for name, cfg in self.configs.items()]

    def _layers(self, components: list[str] | None) -> list[LayerInfo]:
        return [l for l in self.inventory if components is None or l.component in components]

    def linear_bytes(self, components: list[str] | None = None) -> int:
        """Predicted bytes of the Linear layers of ``components`` (default all) under this plan:
        each layer's backend formula (every scale and packed code), full precision where the
        plan leaves a layer alone."""
        return sum(l.nbytes(self.configs[l.name]) if l.name in self.configs else l.bytes
                   for l in self._layers(components))

    def nbytes(self, components: list[str] | None = None) -> int:
        """Predicted bytes of whole ``components`` (default all) under this plan: their Linear
        layers as :meth:`linear_bytes` says, everything else as it is."""
        comps = self.inventory.components
        return sum(comps[c]["bytes"] - comps[c]["linear_bytes"]
                   for c in (components if components is not None else comps)) \
            + self.linear_bytes(components)

    def fp_share(self, components: list[str] | None = None) -> float:
        """The share of the weights of ``components`` that stays in full precision."""
        layers = self._layers(components)
        fp = sum(l.weight_params for l in layers if l.name not in self.configs
                 or self.configs[l.name].full_precision)
        total = sum(l.weight_params for l in layers)
        return fp / total if total else 0.0


def _shown(key: Any) -> str:
    """A layer key as a problem names it (cut if huge)."""
    text = key if isinstance(key, str) else repr(key)
    return text if len(text) <= 120 else text[:117] + "..."


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file (YAML, never pickle; see the limits above)."""
    import os

    from .._errors import expect

    expect(path, (str, os.PathLike), "load_recipe(path)", "a recipe file's path (str or Path)")
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"no recipe file at {path}", str(path))
    try:
        data = _yaml.load_file(path)
    except _yaml.YamlProblem as e:
        raise RecipeError(str(e), str(path)) from None
    except OSError as e:
        raise RecipeError(f"cannot read it: {e.strerror or e}", str(path)) from None
    return Recipe.from_dict(data, source=str(path))
