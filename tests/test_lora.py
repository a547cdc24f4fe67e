"""LoRA on quantized layers (QLoRA style): a peft adapter on each backend's layers of demo-flux,
gradients through the quantized matmul into the adapter, 20 training steps whose loss falls,
the quantized weights untouched; merging into HIGGS layers is refused."""

from __future__ import annotations

import pytest
import torch

import autoquant
from autoquant.plans.lora import add_lora, lora_config

pytest.importorskip("peft")

BLOCKS = "re:transformer\\.(transformer_blocks|single_transformer_blocks)\\..*(to_q|to_k|to_v)"
METHODS = {"hqq": {"method": "hqq", "bits": 4, "group_size": 64},
           "torchao-int8": {"method": "torchao", "type": "int8"},
           "torchao-intx4": {"method": "torchao", "type": "intx", "bits": 4, "group_size": 64},
           "gguf-Q4_K": {"method": "gguf", "type": "Q4_K"},
           "higgs": {"method": "higgs", "bits": 4}}


def _quantized(spec):
    pipe = autoquant.load_pipeline("demo-flux", dtype="float32")
    autoquant.apply_recipe(pipe, autoquant.Recipe.from_dict(
        {"format": "autoquant-recipe/1", "components": ["transformer"],
         "layers": {BLOCKS: spec}}), progress=False)
    return pipe


def _batch(gen):
    return dict(hidden_states=torch.randn(2, 16, 64, generator=gen),
                timestep=torch.full((2,), 0.5),
                encoder_hidden_states=torch.randn(2, 16, 384, generator=gen),
                pooled_projections=torch.randn(2, 384, generator=gen),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(16, 3))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_twenty_lora_steps_on_quantized_layers_lower_the_loss(name):
    if name == "gguf-Q4_K":
        pytest.importorskip("ggml")
    pipe = _quantized(METHODS[name])
    model = add_lora(pipe, lora_config(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"]))
    layer = model.transformer_blocks[0].attn.to_q
    assert type(layer).__name__.endswith(("LoraLinear", "Linear")) and hasattr(layer, "lora_A")
    frozen = {n: b.detach().clone() for n, b in model.named_buffers()}
    trained = [p for n, p in model.named_parameters() if "lora_" in n]
    assert trained and all(p.requires_grad for p in trained)
    assert not [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    opt = torch.optim.AdamW(trained, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    batch, target = _batch(gen), torch.randn(2, 16, 64, generator=gen)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(model(**batch).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers() if n in frozen)


def test_merging_a_lora_into_higgs_layers_is_refused():
    pipe = _quantized(METHODS["higgs"])
    model = add_lora(pipe, lora_config(r=4, target_modules=["to_q"]))
    with pytest.raises(ValueError, match="re-quantize"):
        model.transformer_blocks[0].attn.to_q.merge()
