"""Tensor names of exported files: diffusers' (the module paths) or Black Forest Labs' (the
checkpoint layout ComfyUI and stable-diffusion.cpp read for Flux).

BFL's checkpoint fuses some of diffusers' layers into one tensor -- rows stacked in order -- so
those layers must share one type in a file (:data:`FUSED`); ``final_layer.adaLN_modulation.1``
is ``norm_out.linear`` with its two halves swapped (diffusers splits scale, shift; BFL shift,
scale). Quantization is row by row, so stacking (or swapping) quantized rows *is* quantizing the
stacked tensor: the fused file tensor holds exactly the scored codes.
"""

from __future__ import annotations

import re

#: BFL tensor (with ``{i}``) -> the diffusers layers whose rows it stacks, in order
FUSED_DOUBLE = {
    "double_blocks.{i}.img_attn.qkv": ["transformer_blocks.{i}.attn.to_q",
                                       "transformer_blocks.{i}.attn.to_k",
                                       "transformer_blocks.{i}.attn.to_v"],
    "double_blocks.{i}.txt_attn.qkv": ["transformer_blocks.{i}.attn.add_q_proj",
                                       "transformer_blocks.{i}.attn.add_k_proj",
                                       "transformer_blocks.{i}.attn.add_v_proj"],
}
FUSED_SINGLE = {
    "single_blocks.{i}.linear1": ["single_transformer_blocks.{i}.attn.to_q",
                                  "single_transformer_blocks.{i}.attn.to_k",
                                  "single_transformer_blocks.{i}.attn.to_v",
                                  "single_transformer_blocks.{i}.proj_mlp"],
}
#: one diffusers module -> one BFL module (weights and biases alike)
RENAMED_DOUBLE = {
    "transformer_blocks.{i}.attn.to_out.0": "double_blocks.{i}.img_attn.proj",
    "transformer_blocks.{i}.attn.to_add_out": "double_blocks.{i}.txt_attn.proj",
    "transformer_blocks.{i}.norm1.linear": "double_blocks.{i}.img_mod.lin",
    "transformer_blocks.{i}.norm1_context.linear": "double_blocks.{i}.txt_mod.lin",
    "transformer_blocks.{i}.ff.net.0.proj": "double_blocks.{i}.img_mlp.0",
    "transformer_blocks.{i}.ff.net.2": "double_blocks.{i}.img_mlp.2",
    "transformer_blocks.{i}.ff_context.net.0.proj": "double_blocks.{i}.txt_mlp.0",
    "transformer_blocks.{i}.ff_context.net.2": "double_blocks.{i}.txt_mlp.2",
}
RENAMED_SINGLE = {
    "single_transformer_blocks.{i}.proj_out": "single_blocks.{i}.linear2",
    "single_transformer_blocks.{i}.norm.linear": "single_blocks.{i}.modulation.lin",
}
#: norm scales: diffusers ``...weight`` -> BFL ``...scale``
NORMS_DOUBLE = {
    "transformer_blocks.{i}.attn.norm_q.weight": "double_blocks.{i}.img_attn.norm.query_norm.scale",
    "transformer_blocks.{i}.attn.norm_k.weight": "double_blocks.{i}.img_attn.norm.key_norm.scale",
    "transformer_blocks.{i}.attn.norm_added_q.weight":
        "double_blocks.{i}.txt_attn.norm.query_norm.scale",
    "transformer_blocks.{i}.attn.norm_added_k.weight":
        "double_blocks.{i}.txt_attn.norm.key_norm.scale",
}
NORMS_SINGLE = {
    "single_transformer_blocks.{i}.attn.norm_q.weight": "single_blocks.{i}.norm.query_norm.scale",
    "single_transformer_blocks.{i}.attn.norm_k.weight": "single_blocks.{i}.norm.key_norm.scale",
}
TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}
#: stored with its halves swapped
SWAPPED = {"norm_out.linear": "final_layer.adaLN_modulation.1"}


def _blocks(names, prefix: str) -> list[int]:
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for n in names if (m := pat.match(n))})


def flux_layout(state_keys: list[str]) -> list[tuple[str, list[str], bool]]:
    """``[(BFL tensor, [diffusers tensors stacked in order], halves swapped)]`` for every tensor
    of a ``FluxTransformer2DModel`` state dict; raises ValueError naming what it cannot map."""
    keys = set(state_keys)
    out: list[tuple[str, list[str], bool]] = []
    used: set[str] = set()

    def take(bfl: str, parts: list[str], swapped: bool = False) -> None:
        if all(p in keys for p in parts):
            out.append((bfl, parts, swapped))
            used.update(parts)

    for suffix in ("weight", "bias"):
        for d, b in TOP.items():
            take(f"{b}.{suffix}", [f"{d}.{suffix}"])
        for d, b in SWAPPED.items():
            take(f"{b}.{suffix}", [f"{d}.{suffix}"], swapped=True)
    for prefix, fused, renamed, norms in (
            ("transformer_blocks", FUSED_DOUBLE, RENAMED_DOUBLE, NORMS_DOUBLE),
            ("single_transformer_blocks", FUSED_SINGLE, RENAMED_SINGLE, NORMS_SINGLE)):
        for i in _blocks(keys, prefix):
            for suffix in ("weight", "bias"):
                for b, parts in fused.items():
                    take(f"{b.format(i=i)}.{suffix}",
                         [f"{p.format(i=i)}.{suffix}" for p in parts])
                for d, b in renamed.items():
                    take(f"{b.format(i=i)}.{suffix}", [f"{d.format(i=i)}.{suffix}"])
            for d, b in norms.items():
                take(b.format(i=i), [d.format(i=i)])
    left = sorted(keys - used)
    if left:
        raise ValueError(f"no BFL name for {left[:5]}{' ...' if len(left) > 5 else ''}: this is "
                         f"not a FluxTransformer2DModel; export with --names diffusers")
    return out


def fused_groups(layer_names: list[str], component: str) -> list[list[str]]:
    """The layers (``component.path``) that one BFL tensor stacks: they must share a type."""
    keys = [n[len(component) + 1:] + ".weight" for n in layer_names
            if n.startswith(component + ".")]
    groups = []
    for _, parts, _ in flux_layout(keys) if keys else []:
        if len(parts) > 1:
            groups.append([f"{component}.{p[:-len('.weight')]}" for p in parts])
    return groups
