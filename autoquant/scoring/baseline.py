"""Uniform baselines: every quantizable layer of the searched components at one config.

``protect="default"`` keeps in full precision the layers people leave alone today (what
diffusers/Pruna users pass as ``modules_to_not_convert``): the input embedders and conditioning
projections at the top of the denoiser, and its final norm and projection. The rule is by name,
at the top level of the component (a block's inner ``proj_out`` is not protected):
``PROTECTED_TOP_LEVEL`` below. The protected share is reported as the full-precision share.
"""

from __future__ import annotations

from typing import Any

from .._errors import InputError
from ..backends import QuantConfig
from ..models.inventory import Inventory
from ..plans.recipe import Recipe

PROTECTED_TOP_LEVEL = (
    # input embedders and conditioning projections
    "x_embedder", "context_embedder", "time_text_embed", "time_embed", "time_embedding",
    "time_proj", "pos_embed", "patch_embed", "caption_projection", "adaln_single",
    "add_embedding", "class_embedding", "proj_in", "conv_in", "emb",
    # the final norm / projection
    "norm_out", "proj_out", "conv_out",
)


def is_protected(layer) -> bool:
    """Is ``layer`` (a :class:`~autoquant.LayerInfo`) one of the usual layers kept in full
    precision?"""
    return layer.path.split(".")[0] in PROTECTED_TOP_LEVEL


def protected_layers(inv: Inventory, components: list[str]) -> list[str]:
    return [layer.name for layer in inv if layer.component in components and is_protected(layer)]


def baseline_recipe(inv: Inventory, config: QuantConfig, components: list[str],
                    protect: str = "none", model: dict[str, Any] | None = None) -> Recipe:
    if protect not in ("none", "default"):
        raise InputError(f"--protect {protect!r}: choose 'none' or 'default'")
    from ..backends import full_precision

    keep = protected_layers(inv, components) if protect == "default" else []
    return Recipe(default=config, components=list(components),
                  layers={name: full_precision() for name in keep},
                  model={**(model or {}), "fingerprint": inv.fingerprint()},
                  provenance={"kind": "uniform baseline", "protect": protect})
