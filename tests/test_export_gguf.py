"""``autoquant export --format gguf``: the file holds the scored weights (loaded by diffusers it
makes the very images the recipe made), BFL names in ComfyUI's layout, metadata, refusals, and
untrusted files given to ``evaluate --gguf``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("ggml")
gguf = pytest.importorskip("gguf")

import autoquant  # noqa: E402
from autoquant import AutoquantError  # noqa: E402
from autoquant.cli.commands import main  # noqa: E402
from autoquant.export.gguf import check_file, export_gguf, load_gguf  # noqa: E402
from tests.helpers import file_and_scored, two_images  # noqa: E402

MIXED = {"format": "autoquant-recipe/1", "components": ["transformer"],
         "default": {"method": "gguf", "type": "Q4_0"},
         "layers": {"re:.*ff\\.net\\.2": {"method": "gguf", "type": "Q8_0"},
                    "re:.*proj_mlp": {"method": "gguf", "type": "IQ4_NL"},
                    "re:.*norm1\\.linear": {"method": "none"}}}


@pytest.fixture(scope="module")
def pipe():
    return autoquant.load_pipeline("tiny-flux", dtype="bfloat16")


def test_the_diffusers_file_loaded_by_diffusers_makes_the_scored_images(pipe, tmp_path):
    recipe = autoquant.Recipe.from_dict(MIXED)
    info = export_gguf(pipe, recipe, tmp_path / "m.gguf", names="diffusers", progress=False)
    assert {"Q4_0", "Q8_0", "IQ4_NL", "BF16", "F32"} <= set(info["types"])
    loaded = load_gguf(tmp_path / "m.gguf", pipe)
    assert type(loaded).__name__ == "FluxTransformer2DModel"
    reference = two_images(pipe)
    from_file, scored = file_and_scored(pipe, loaded, recipe)
    assert torch.equal(from_file, scored)  # what is scored is what ships
    assert not torch.equal(scored, reference)
    # the file's tensor bytes are the byte formulas' (codes) plus F32 biases and norms
    inv = autoquant.inventory(pipe)
    plan = recipe.resolve(inv)
    from autoquant.backends import full_precision, get_backend

    layers = [l for l in inv if l.component == "transformer"]
    codes = sum(get_backend(c.method).nbytes(c, l.out_features, l.in_features, False, l.dtype)
                for l in layers for c in [plan.configs.get(l.name, full_precision())])
    biases = sum(4 * t.numel() for k, t in pipe.transformer.state_dict().items()
                 if not (k.endswith(".weight") and k[:-7] in
                         {l.path for l in layers}))
    assert info["tensor_bytes"] == codes + biases
    assert abs(info["bytes"] - info["tensor_bytes"]) < 64 * 1024  # the header and padding


def test_the_bfl_file_has_comfyuis_flux_layout(pipe, tmp_path):
    recipe = autoquant.Recipe.from_dict({"format": "autoquant-recipe/1",
                                         "components": ["transformer"],
                                         "default": {"method": "gguf", "type": "Q8_0"}})
    export_gguf(pipe, recipe, tmp_path / "b.gguf", names="bfl", progress=False)
    reader = gguf.GGUFReader(str(tmp_path / "b.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    t = pipe.transformer
    inner = t.config.num_attention_heads * t.config.attention_head_dim
    mlp = t.single_transformer_blocks[0].proj_mlp.out_features
    shape = lambda name: tuple(int(d) for d in reversed(tensors[name].shape))  # noqa: E731
    assert shape("double_blocks.0.img_attn.qkv.weight") == (3 * inner, inner)
    assert shape("double_blocks.0.txt_attn.qkv.weight") == (3 * inner, inner)
    assert shape("single_blocks.0.linear1.weight") == (3 * inner + mlp, inner)
    assert shape("single_blocks.0.linear2.weight") == (inner, inner + mlp)
    for name in ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight",
                 "vector_in.in_layer.weight", "final_layer.linear.weight",
                 "final_layer.adaLN_modulation.1.weight", "double_blocks.0.img_mod.lin.weight",
                 "double_blocks.0.img_attn.norm.query_norm.scale",
                 "single_blocks.0.modulation.lin.weight", "single_blocks.0.norm.key_norm.scale",
                 "double_blocks.0.img_mlp.0.weight", "double_blocks.0.txt_attn.proj.bias"):
        assert name in tensors, name
    assert not any(n.startswith(("transformer_blocks", "single_transformer_blocks"))
                   for n in tensors)
    assert tensors["double_blocks.0.img_attn.norm.query_norm.scale"].tensor_type.name == "F32"
    # the fused tensor holds the three layers' rows, quantized as they were scored
    q = t.transformer_blocks[0].attn
    from autoquant.backends.gguf import quantize_rows

    stacked = np.concatenate([quantize_rows(m.weight.detach().float().numpy(), "Q8_0")
                              for m in (q.to_q, q.to_k, q.to_v)])
    assert np.array_equal(tensors["double_blocks.0.img_attn.qkv.weight"].data, stacked)
    # adaLN_modulation.1 is norm_out.linear with its halves swapped
    w = t.norm_out.linear.weight.detach().float()
    half = w.shape[0] // 2
    final = gguf.dequantize(tensors["final_layer.adaLN_modulation.1.weight"].data,
                            gguf.GGMLQuantizationType.Q8_0)
    swapped = torch.cat([w[half:], w[:half]])
    assert np.allclose(final, swapped.numpy(), atol=0.02 * swapped.abs().max().item())
    fields = reader.fields
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    assert arch == "flux"
    saved = bytes(fields["autoquant.recipe"].parts[-1]).decode()
    import yaml

    assert autoquant.Recipe.from_dict(yaml.safe_load(saved)).default == recipe.default


def test_layers_of_other_methods_are_refused_or_requantized_by_bytes(pipe, tmp_path):
    hqq = autoquant.Recipe.from_dict({"format": "autoquant-recipe/1",
                                      "components": ["transformer"],
                                      "default": {"method": "hqq", "bits": 4, "group_size": 16},
                                      # 16 wide: no GGUF type takes it
                                      "layers": {"transformer.x_embedder": {"method": "none"}}})
    with pytest.raises(AutoquantError, match="(?s)cannot hold.*--requantize"):
        export_gguf(pipe, hqq, tmp_path / "x.gguf", names="diffusers", progress=False)
    assert not (tmp_path / "x.gguf").exists()
    info = export_gguf(pipe, hqq, tmp_path / "x.gguf", names="diffusers", requantize=True,
                       progress=False)
    assert info["requantized"] and all("hqq4-g16 -> gguf-" in v
                                       for v in info["requantized"].values())
    from autoquant.backends import config_from_dict, get_backend

    h = config_from_dict({"method": "hqq", "bits": 4, "group_size": 16})
    for layer, how in info["requantized"].items():
        target = config_from_dict({"method": "gguf",
                                   "type": how.split("gguf-")[1].upper().replace("IQ4_NL", "IQ4_NL")})
        l = next(x for x in autoquant.inventory(pipe) if x.name == layer)
        assert get_backend("gguf").nbytes(target, l.out_features, l.in_features, False, l.dtype) \
            <= get_backend("hqq").nbytes(h, l.out_features, l.in_features, False, l.dtype)


def test_hqq_4_bit_maps_to_q4_1_with_its_own_codes_and_is_scored_again(pipe, tmp_path):
    """hqq computes (q - zero) * scale, Q4_1 d * q + m: the same codes, d and m in fp16."""
    recipe = autoquant.Recipe.from_dict({"format": "autoquant-recipe/1",
                                         "components": ["transformer"],
                                         "default": {"method": "hqq", "bits": 4,
                                                     "group_size": 32}})
    info = export_gguf(pipe, recipe, tmp_path / "h.gguf", names="diffusers", progress=False)
    assert info["types"].get("Q4_1") and all("-> Q4_1 (near-exact" in v
                                              for v in info["requantized"].values())
    lin = pipe.transformer.transformer_blocks[0].attn.to_q
    reader = gguf.GGUFReader(str(tmp_path / "h.gguf"))
    data = next(t for t in reader.tensors if t.name == "transformer_blocks.0.attn.to_q.weight")
    mapped = torch.from_numpy(gguf.dequantize(data.data, gguf.GGMLQuantizationType.Q4_1))
    from autoquant.backends import config_from_dict, quantize_layer

    h = quantize_layer(lin, config_from_dict({"method": "hqq", "bits": 4, "group_size": 32}),
                       torch.device("cpu"))
    hqq_w = h.dequantize().float()
    assert (mapped - hqq_w).abs().max() <= 0.02 * hqq_w.abs().max()
    loaded = load_gguf(tmp_path / "h.gguf", pipe)
    from_file, scored = file_and_scored(pipe, loaded, recipe)
    mse = (from_file - scored).pow(2).mean().item()
    assert mse > 0 and 10 * np.log10(1 / mse) > 35  # near, not identical: scored again


def test_fused_bfl_tensors_must_share_a_type(pipe, tmp_path):
    split = autoquant.Recipe.from_dict({
        "format": "autoquant-recipe/1", "components": ["transformer"],
        "default": {"method": "gguf", "type": "Q4_0"},
        "layers": {"transformer.transformer_blocks.0.attn.to_q": {"method": "gguf",
                                                                  "type": "Q8_0"}}})
    with pytest.raises(AutoquantError, match="double_blocks.0.img_attn.qkv.weight"):
        export_gguf(pipe, split, tmp_path / "s.gguf", names="bfl", progress=False)
    assert export_gguf(pipe, split, tmp_path / "s.gguf", names="diffusers", progress=False)


def test_untrusted_files_get_one_clear_line(pipe, tmp_path, capsys):
    recipe = autoquant.Recipe.from_dict(MIXED)
    export_gguf(pipe, recipe, tmp_path / "good.gguf", names="diffusers", progress=False)
    export_gguf(pipe, recipe.__class__.from_dict({**MIXED, "layers": {}}), tmp_path / "bfl.gguf",
                names="bfl", progress=False)
    data = (tmp_path / "good.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    other = autoquant.load_pipeline("tiny-sd", dtype="bfloat16")
    cases = {"cut.gguf": "truncated|not a readable GGUF", "junk.gguf": "not a readable GGUF",
             "bfl.gguf": "Black Forest Labs' names", "missing.gguf": "no such file"}
    for name, message in cases.items():
        with pytest.raises(AutoquantError, match=message):
            check_file(tmp_path / name, pipe.transformer)
    with pytest.raises(AutoquantError, match="does not fit this model"):
        check_file(tmp_path / "good.gguf", other.unet)
    rc = main(["evaluate", "--model", "tiny-flux", "--gguf", str(tmp_path / "cut.gguf"),
               "--no-clip", "--json"])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_export_then_evaluate_scores_the_file_as_the_recipe(tmp_path, capsys):
    rec = tmp_path / "q.yaml"
    autoquant.Recipe.from_dict({**MIXED, "model": {"id": "tiny-flux"}}).save(rec)
    assert main(["export", "--recipe", str(rec), "--out", str(tmp_path / "q.gguf"),
                 "--names", "diffusers", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["names"] == "diffusers" and (tmp_path / "q.gguf").stat().st_size == info["bytes"]
    scores = {}
    for flag, value in (("--recipe", rec), ("--gguf", tmp_path / "q.gguf")):
        assert main(["evaluate", "--model", "tiny-flux", flag, str(value), "--no-clip",
                     "--json"]) == 0
        scores[flag] = json.loads(capsys.readouterr().out)["metrics"]["psnr"]["mean"]
    assert scores["--recipe"] == scores["--gguf"]


def test_search_on_the_gguf_space_exports_its_best_plan(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["search", "--model", "tiny-flux", "--space", "gguf", "--budget", "45%",
                 "--trials", "3", "--export", "gguf", "--out", str(out), "--no-clip",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    e = report["export"]
    assert e["names"] == "bfl" and (out / "best.gguf").stat().st_size == e["bytes"]
    best = autoquant.load_recipe(out / "best.yaml")
    plan = best.resolve(autoquant.inventory(autoquant.load_pipeline("tiny-flux",
                                                                    dtype="bfloat16")))
    q = plan.configs["transformer.single_transformer_blocks.0.attn.to_q"]
    fused = e["tensor_types"]["single_blocks.0.linear1.weight"]
    assert fused == (q.type if q.method == "gguf" else "BF16")
    # a space of other methods cannot be exported: said before any model loads
    assert main(["search", "--model", "tiny-flux", "--space", "default", "--budget", "45%",
                 "--export", "gguf", "--out", str(tmp_path / "x"), "--no-clip"]) == 2
    assert "--space gguf" in capsys.readouterr().err
