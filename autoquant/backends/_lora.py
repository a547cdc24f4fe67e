"""LoRA layers for autoquant's quantized layers: peft's own LoRA layer for each, whose merge
is refused.

Merging a LoRA into a quantized layer means re-quantizing the merged weights: the layer that
results is not the one that was scored (peft re-runs hqq's optimizer on hqq layers; it refuses
torchao layers; on a GGUF layer it adds the update to packed bytes and fails). Layers made
through :func:`autoquant.plans.lora.lora_config` (``add_lora``, ``load_lora_weights``) refuse
``merge`` / ``fuse_lora`` with one message; full-precision layers keep peft's exact merge.
"""

from __future__ import annotations

import functools

MERGE_REFUSED = ("merging a LoRA into {what} layers would re-quantize them, and the merged "
                 "layer would not be the one scored: keep the adapter unmerged (it runs beside "
                 "the quantized layer), or fuse it into the full-precision model and apply the "
                 "recipe again")


@functools.cache
def refusing_merge(base: type, what: str) -> type:
    """A subclass of the peft LoRA layer class ``base`` whose ``merge`` and ``unmerge`` raise
    ValueError (``what``: the layers' method, for the message)."""
    def merge(self, safe_merge=False, adapter_names=None):
        raise ValueError(MERGE_REFUSED.format(what=what))

    def unmerge(self):
        return None  # never merged: nothing to undo (fuse_lora's undo reaches every layer)

    name = f"NoMerge{base.__name__}"
    return type(name, (base,), {"merge": merge, "unmerge": unmerge, "__module__": __name__,
                                "__qualname__": name,
                                "__doc__": f"peft's {base.__name__}; merging refused."})


__all__ = ["refusing_merge", "MERGE_REFUSED"]
