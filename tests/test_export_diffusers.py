"""``autoquant export --format diffusers``: a folder that a plain ``DiffusionPipeline.from_pretrained``
loads (no autoquant import) holds the scored weights bit for bit and makes the scored images;
what one component cannot hold is refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import autoquant
from autoquant import AutoquantError
from autoquant.cli.commands import main
from autoquant.export.diffusers import RECORD, export_diffusers, load_component

pytest.importorskip("torchao")

#: every torchao config that quantizes and runs on a CPU, one per layer type of the blocks
CPU_TORCHAO = [{"method": "torchao", "type": "int8"},
               {"method": "torchao", "type": "int8_dynamic"},
               {"method": "torchao", "type": "fp8"},
               *({"method": "torchao", "type": "intx", "bits": b, "group_size": 64}
                 for b in range(1, 9))]
CALL = dict(num_inference_steps=4, true_cfg_scale=3.0, height=32, width=32,
            max_sequence_length=16)
PROMPTS = ["a shirt", "a sneaker"]


def _mixed_torchao(pipe) -> autoquant.Recipe:
    """Every CPU torchao config on some layers of the denoiser, some layers left alone."""
    layers = [l for l in autoquant.inventory(pipe) if l.component == "transformer"]
    configs = [*CPU_TORCHAO, {"method": "none"}]
    return autoquant.Recipe.from_dict({
        "format": "autoquant-recipe/1", "components": ["transformer"],
        "layers": {l.name: configs[i % len(configs)] for i, l in enumerate(layers)}})


@pytest.fixture(scope="module")
def pipe():
    return autoquant.load_pipeline("demo-flux", dtype="float32")


@pytest.fixture(scope="module")
def exported(pipe, tmp_path_factory):
    recipe = _mixed_torchao(pipe)
    folder = tmp_path_factory.mktemp("export") / "demo-flux-torchao"
    info = export_diffusers(pipe, recipe, folder, progress=False)
    return recipe, folder, info


def _inner(weight) -> dict:
    """A weight's tensors: a torchao subclass's inner tensors, or the tensor itself."""
    if hasattr(weight, "__tensor_flatten__"):
        names, _ = weight.__tensor_flatten__()
        return {n: getattr(weight, n) for n in names}
    return {"": weight}


def _images(p, **extra):
    negative = [""] * len(PROMPTS)  # as the scorer calls it: one negative prompt per prompt
    return p(PROMPTS, negative_prompt=negative, generator=torch.Generator().manual_seed(0),
             output_type="np", **CALL, **extra).images


def test_the_folder_names_stock_classes_and_records_the_plan(exported):
    recipe, folder, info = exported
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"  # not autoquant's DemoFluxPipeline
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert all(v[0] in ("diffusers", "transformers", None) for k, v in index.items()
               if not k.startswith("_"))
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert info["components"]["transformer"]["how"] == "torchao"
    assert info["components"]["transformer"]["layers"] == sum(
        1 for c in recipe.layers.values() if not c.full_precision)
    assert autoquant.load_recipe(folder / "recipe.yaml").layers == recipe.layers
    modes = {oct(f.stat().st_mode & 0o777) for f in folder.rglob("*") if f.is_file()}
    assert modes == {oct(0o666 & ~_umask())}  # shareable files, not safetensors' private 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_every_cpu_torchao_config_is_bit_identical_to_autoquants_layers(pipe, exported):
    recipe, folder, _ = exported
    loaded = load_component(folder, "transformer", pipe.transformer)
    layers = autoquant.inventory(pipe)  # before applying: the inventory lists plain layers
    autoquant.apply_recipe(pipe, recipe, progress=False, keep_originals=True)
    try:
        seen = set()
        for layer in layers:
            if layer.component != "transformer":
                continue
            mine = pipe.transformer.get_submodule(layer.path).weight
            theirs = loaded.get_submodule(layer.path).weight
            assert type(theirs) is type(mine), layer.path
            a, b = _inner(mine), _inner(theirs)
            assert a.keys() == b.keys() and all(
                a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), layer.path
            seen.add(type(mine).__name__)
    finally:
        autoquant.revert(pipe)
    assert {"Int8Tensor", "Float8Tensor", "IntxUnpackedToInt8Tensor", "Parameter"} <= seen


def test_a_plain_diffusers_process_loads_the_folder_and_makes_the_scored_images(
        pipe, exported, tmp_path):
    recipe, folder, _ = exported
    script = textwrap.dedent(f"""
        import sys, numpy as np, torch
        from diffusers import DiffusionPipeline
        # torch_dtype as the model card's snippet says: diffusers' torchao loader takes
        # bfloat16 when none is given
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, torch_dtype=torch.float32)
        assert type(pipe).__name__ == "FluxPipeline"
        assert not [m for m in sys.modules if m.split(".")[0] == "autoquant"]
        images = pipe({PROMPTS!r}, negative_prompt=[""] * {len(PROMPTS)},
                      generator=torch.Generator().manual_seed(0), output_type="np",
                      **{CALL!r}).images
        np.save({str(tmp_path / "images.npy")!r}, images)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = np.load(tmp_path / "images.npy")
    autoquant.apply_recipe(pipe, recipe, progress=False, keep_originals=True)
    torch.set_num_threads(1)  # the same threads as the subprocess: the same float sums
    try:
        mine = _images(pipe)
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
        autoquant.revert(pipe)
    assert np.array_equal(mine, theirs)


def test_a_gguf_plan_is_the_denoiser_as_one_gguf_file_beside_the_folder(tmp_path):
    pytest.importorskip("ggml")
    tiny = autoquant.load_pipeline("tiny-flux", dtype="bfloat16")
    recipe = autoquant.Recipe.from_dict({
        "format": "autoquant-recipe/1", "components": ["transformer"],
        "default": {"method": "gguf", "type": "Q4_0"},
        "layers": {"re:.*norm1\\.linear": {"method": "none"}}})
    info = export_diffusers(tiny, recipe, tmp_path / "out", progress=False)
    assert info["components"]["transformer"]["how"] == "gguf"
    assert (tmp_path / "out" / "transformer" / "diffusion_pytorch_model.gguf").is_file()
    assert not list((tmp_path / "out" / "transformer").glob("*.safetensors"))
    # the documented two lines: the GGUF denoiser, then the pipeline around it
    from diffusers import FluxPipeline, FluxTransformer2DModel, GGUFQuantizationConfig

    transformer = FluxTransformer2DModel.from_single_file(
        str(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.gguf"),
        config=str(tmp_path / "out" / "transformer"), torch_dtype=torch.bfloat16,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16))
    loaded = FluxPipeline.from_pretrained(tmp_path / "out", transformer=transformer,
                                          torch_dtype=torch.bfloat16)
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="np",
              max_sequence_length=16)
    theirs = loaded(["a red cube"], generator=torch.Generator().manual_seed(0), **kw).images
    autoquant.apply_recipe(tiny, recipe, progress=False)
    mine = tiny(["a red cube"], generator=torch.Generator().manual_seed(0), **kw).images
    assert np.array_equal(mine, theirs)


def _recipe(layers: dict) -> autoquant.Recipe:
    return autoquant.Recipe.from_dict({"format": "autoquant-recipe/1", "layers": layers})


@pytest.mark.parametrize("layers, says", [
    ({"re:transformer\\..*ff\\.net\\.2": {"method": "hqq", "bits": 4, "group_size": 64}},
     ["ff.net.2 (hqq", "formats that hold this component", "--requantize"]),
    ({"re:transformer\\..*to_q": {"method": "torchao", "type": "int8"},
      "re:transformer\\..*to_k": {"method": "gguf", "type": "Q8_0"}},
     ["mixes gguf and torchao"]),
    ({"re:text_encoder\\..*query": {"method": "torchao", "type": "int8"}},
     ["text_encoder (BertModel) has quantized layers"]),
])
def test_what_one_component_cannot_hold_is_refused_before_writing(pipe, tmp_path, layers, says):
    with pytest.raises(AutoquantError) as e:
        export_diffusers(pipe, _recipe(layers), tmp_path / "out", progress=False)
    for text in says:
        assert text in str(e.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir()]  # no half-written folder beside it


def test_gpu_only_configs_ask_for_a_gpu(pipe, tmp_path):
    recipe = _recipe({"re:transformer\\..*to_q": {"method": "torchao", "type": "fp8_dynamic"}})
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the GPU test covers fp8_dynamic")
    with pytest.raises(AutoquantError, match="--device cuda"):
        export_diffusers(pipe, recipe, tmp_path / "out", progress=False)


def test_a_folder_of_other_files_is_never_replaced(pipe, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    recipe = _recipe({"re:transformer\\..*to_q": {"method": "torchao", "type": "int8"}})
    with pytest.raises(AutoquantError, match="holds other files"):
        export_diffusers(pipe, recipe, tmp_path, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_cli_exports_and_evaluate_scores_the_folder_as_the_recipe(pipe, exported, tmp_path,
                                                                  capsys):
    recipe, _, _ = exported
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    out = tmp_path / "folder"
    assert main(["export", "--model", "demo-flux", "--dtype", "float32", "--recipe", str(path),
                 "--format", "diffusers", "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (out / RECORD).is_file() and info["components"]["transformer"]["how"] == "torchao"
    common = ["evaluate", "--model", "demo-flux", "--dtype", "float32", "--seeds", "0",
              "--steps", "3", "--no-clip", "--json", "--prompts"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("a shirt\na bag\n")
    assert main([*common, str(prompts), "--diffusers", str(out)]) == 0
    from_folder = json.loads(capsys.readouterr().out)
    assert main([*common, str(prompts), "--recipe", str(path)]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert from_folder["psnr"] == scored["psnr"]
    _check_card(out, info)
    # a second export replaces the folder it wrote (and only such a folder)
    assert main(["export", "--model", "demo-flux", "--dtype", "float32", "--recipe", str(path),
                 "--format", "diffusers", "--out", str(out), "--json"]) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [{"method": "torchao", "type": "int4", "group_size": 64},
                                 {"method": "torchao", "type": "fp8_dynamic"}])
def test_gpu_torchao_configs_round_trip_bit_identical(cfg, tmp_path):
    # tiny-flux: the GPU machine has no MiniLM for the demos' text encoders
    pipe = autoquant.load_pipeline("tiny-flux", dtype="bfloat16")
    recipe = _recipe({"re:transformer\\..*(to_q|to_k|ff\\.net\\.2)": cfg})
    export_diffusers(pipe, recipe, tmp_path / "out", device="cuda", progress=False)
    loaded = load_component(tmp_path / "out", "transformer", pipe.transformer).to("cuda")
    layers = autoquant.inventory(pipe)
    chosen = recipe.resolve(layers).configs
    pipe.to("cuda")
    autoquant.apply_recipe(pipe, recipe, progress=False)
    n = 0
    for layer in layers:
        if layer.component == "transformer" and layer.name in chosen:
            a = _inner(pipe.transformer.get_submodule(layer.path).weight)
            b = _inner(loaded.get_submodule(layer.path).weight)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].device))
                                                for k in a), layer.path
            n += 1
    assert n > 0


def _check_card(folder, info):
    """The card: hub front matter, the plan per block, pictures, the fidelity the export
    measured (the folder loaded by diffusers) and the snippet that loads it."""
    import yaml

    text = (folder / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == "demo-flux" and front["library_name"] == "diffusers"
    assert {"autoquant", "torchao"} <= set(front["tags"])
    assert "| transformer.transformer_blocks.0 | 14 |" in text
    for png in ("bitmap.png", "images.png"):
        assert (folder / png).read_bytes().startswith(b"\x89PNG") and f"({png})" in text
    fid = info["fidelity"]
    assert fid["images"] > 0 and f"| {fid['psnr']:.2f} |" in text
    assert info["snippet"] in text and "torch_dtype=torch.float32" in info["snippet"]


def test_the_card_copies_a_plain_licence_from_the_base_models_card_only(tmp_path):
    from autoquant.export.card import base_license

    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# base\n")
    assert base_license(str(tmp_path)) == "apache-2.0"
    (tmp_path / "README.md").write_text("---\nlicense: \"<script>alert(1)</script>\"\n---\n")
    assert base_license(str(tmp_path)) is None
    (tmp_path / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    assert base_license(str(tmp_path)) is None
    assert base_license(str(tmp_path / "missing")) is None


def test_a_gguf_export_writes_its_card_but_never_over_a_foreign_readme(tmp_path, capsys):
    pytest.importorskip("ggml")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("format: autoquant-recipe/1\ncomponents: [transformer]\n"
                      "default: {method: gguf, type: Q8_0}\n")
    args = ["export", "--model", "tiny-flux", "--recipe", str(recipe), "--names", "diffusers",
            "--json"]
    (tmp_path / "a").mkdir()
    assert main([*args, "--out", str(tmp_path / "a" / "m.gguf")]) == 0
    card = (tmp_path / "a" / "README.md").read_text()
    assert "library_name: gguf" in card and "from_single_file" in card
    assert "autoquant evaluate --model tiny-flux --gguf" in card
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "README.md").write_text("my own notes")
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "b" / "m.gguf")]) == 0
    assert json.loads(capsys.readouterr().out)["card"] is None
    assert (tmp_path / "b" / "README.md").read_text() == "my own notes"


def test_search_exports_its_best_plan_as_a_diffusers_folder(tmp_path, capsys):
    pytest.importorskip("ggml")
    out = tmp_path / "s"
    assert main(["search", "--model", "tiny-flux", "--space", "gguf", "--budget", "45%",
                 "--trials", "3", "--export", "diffusers", "--out", str(out), "--no-clip",
                 "--json"]) == 0
    e = json.loads(capsys.readouterr().out)["export"]
    folder = out / "best-diffusers"
    assert e["path"] == str(folder) and (folder / RECORD).is_file()
    assert (folder / "transformer" / "diffusion_pytorch_model.gguf").is_file()
    assert "README.md" in {p.name for p in folder.iterdir()}
    # a space diffusers cannot hold is refused before any model loads
    assert main(["search", "--model", "tiny-flux", "--space", "default", "--budget", "45%",
                 "--export", "diffusers", "--out", str(tmp_path / "x"), "--no-clip"]) == 2
    assert "cannot hold" in capsys.readouterr().err
