"""LoRA on quantized layers (QLoRA style): a peft adapter on each backend's layers of demo-flux,
gradients through the quantized matmul into the adapter, 20 training steps whose loss falls,
the quantized weights untouched; a LoRA trained on full precision, saved in diffusers' format
and loaded on each method gives LoRA-on-full-precision's images up to quantization error;
merging into quantized layers is refused, into full-precision ones it is exact."""

from __future__ import annotations

import pytest
import torch

import autoquant
from autoquant.plans.lora import add_lora, load_lora_weights, lora_config

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


@pytest.mark.parametrize("name", sorted(METHODS))
def test_merging_a_lora_into_quantized_layers_is_refused(name):
    if name == "gguf-Q4_K":
        pytest.importorskip("ggml")
    pipe = _quantized(METHODS[name])
    model = add_lora(pipe, lora_config(r=4, target_modules=["to_q"]))
    with pytest.raises(ValueError, match="re-quantize them"):
        model.transformer_blocks[0].attn.to_q.merge()
    model.transformer_blocks[0].attn.to_q.unmerge()  # nothing merged: nothing to undo


def _images(pipe):
    return pipe(["a red cube", "a blue ball"], num_inference_steps=2, height=64, width=64,
                output_type="pt", generator=torch.Generator().manual_seed(0)).images


def _psnr(a, b):
    return 10 * torch.log10(1 / ((a - b) ** 2).mean()).item()


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory):
    """A LoRA trained for a few steps on full-precision demo-flux, saved in diffusers' format
    (``save_lora_weights``), with full precision's images without and with it."""
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    pipe = autoquant.load_pipeline("demo-flux", dtype="float32")
    reference = _images(pipe)
    model = add_lora(pipe, lora_config(r=4, lora_alpha=8, target_modules=["to_q", "to_k",
                                                                         "to_v"]))
    trained = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(trained, lr=3e-2)
    gen = torch.Generator().manual_seed(1)
    batch = _batch(gen)
    with torch.no_grad():  # a fine-tune: full precision's output, nudged
        target = model(**batch).sample + 0.5 * torch.randn(2, 16, 64, generator=gen)
    for _ in range(10):
        loss = torch.nn.functional.mse_loss(model(**batch).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("lora")
    type(pipe).save_lora_weights(  # with its config (alpha), as diffusers' trainers save it
        str(folder), transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    model.requires_grad_(False)
    with torch.no_grad():
        with_lora = _images(pipe)
    assert _psnr(with_lora, reference) < 40  # the LoRA changes the images
    return folder, reference, with_lora


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_saved_lora_loads_on_every_method_like_on_full_precision(name, trained_lora):
    if name == "gguf-Q4_K":
        pytest.importorskip("ggml")
    folder, reference, with_lora = trained_lora
    pipe = _quantized(METHODS[name])
    quantized = _images(pipe)
    adapter = load_lora_weights(pipe, str(folder))
    assert adapter in pipe.transformer.peft_config
    lora_quantized = _images(pipe)
    # the same images as LoRA on full precision, up to the quantization error
    assert _psnr(lora_quantized, with_lora) > _psnr(quantized, reference) - 3
    assert _psnr(lora_quantized, quantized) < _psnr(lora_quantized, with_lora)
    with pytest.raises(ValueError, match="re-quantize them"):
        pipe.fuse_lora()
    pipe.unfuse_lora()
    pipe.unload_lora_weights()  # diffusers' own unload: the quantized plan, as it was
    assert torch.equal(_images(pipe), quantized)


@pytest.mark.parametrize("name", ["hqq", "torchao-int8", "gguf-Q4_K"])
def test_diffusers_own_load_lora_weights_works_where_peft_dispatches(name, trained_lora):
    if name == "gguf-Q4_K":
        pytest.importorskip("ggml")
    folder, _, with_lora = trained_lora
    pipe = _quantized(METHODS[name])
    pipe.load_lora_weights(str(folder))  # hqq: its layers show diffusers their weight's shape
    mine = _quantized(METHODS[name])
    load_lora_weights(mine, str(folder))
    assert torch.equal(_images(pipe), _images(mine))


def test_a_lora_fuses_exactly_into_full_precision_layers(trained_lora):
    folder, _, with_lora = trained_lora
    pipe = autoquant.load_pipeline("demo-flux", dtype="float32")
    load_lora_weights(pipe, str(folder))
    pipe.fuse_lora()
    assert _psnr(_images(pipe), with_lora) > 60
    pipe.unfuse_lora()
    pipe.unload_lora_weights()


def test_a_lora_for_other_layers_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"transformer.no_such_block.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer.no_such_block.to_q.lora_B.weight": torch.zeros(64, 4)},
              str(tmp_path / "pytorch_lora_weights.safetensors"))
    pipe = _quantized(METHODS["hqq"])
    with pytest.raises(autoquant.AutoquantError):
        load_lora_weights(pipe, str(tmp_path))


def test_a_lora_files_saved_config_cannot_rewrite_the_base_layers(trained_lora, tmp_path):
    """init_lora_weights="pissa" in a file's config would rewrite the base weights at load:
    only the fields that shape the adapter are read."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    folder, _, with_lora = trained_lora
    path = folder / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["lora_adapter_metadata"])  # diffusers' key, prefixed fields
    config["transformer.init_lora_weights"] = "pissa"
    save_file(tensors, str(tmp_path / "pytorch_lora_weights.safetensors"),
              metadata={**meta, "lora_adapter_metadata": json.dumps(config)})
    pipe = autoquant.load_pipeline("demo-flux", dtype="float32")
    before = pipe.transformer.transformer_blocks[0].attn.to_q.weight.detach().clone()
    load_lora_weights(pipe, str(tmp_path))
    assert torch.equal(pipe.transformer.transformer_blocks[0].attn.to_q.base_layer.weight, before)
    assert _psnr(_images(pipe), with_lora) > 60
