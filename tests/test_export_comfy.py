"""``autoquant export --format comfy``: a ComfyUI mixed-precision checkpoint. Its quantized
layers, built as ComfyUI's loader builds them (comfy-kitchen's layouts) and dequantized, are
autoquant's own weights -- bit for bit for int8, near-exactly for fp8 and hqq's awq_w4a16 --
in ComfyUI's Flux layout; refusals and untrusted files."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("comfy_kitchen")

import autoquant  # noqa: E402
from autoquant import AutoquantError  # noqa: E402
from autoquant.backends import get_backend  # noqa: E402
from autoquant.cli.commands import main  # noqa: E402
from autoquant.export.comfy import export_comfy, linear_bytes, load_comfy, read_comfy  # noqa: E402
from tests.helpers import file_and_scored, two_images  # noqa: E402


def _recipe(default, **layers):
    return autoquant.Recipe.from_dict({"format": "autoquant-recipe/1",
                                       "components": ["transformer"], "default": default,
                                       "layers": {"re:.*norm1\\.linear": {"method": "none"},
                                                  **layers}})


INT8 = {"method": "torchao", "type": "int8"}
FP8 = {"method": "torchao", "type": "fp8"}
HQQ4 = {"method": "hqq", "bits": 4, "group_size": 64}


@pytest.fixture(scope="module")
def pipe():
    return autoquant.load_pipeline("tiny-flux", dtype="bfloat16")


def _scored_weights(pipe, recipe) -> dict[str, torch.Tensor]:
    """Each quantized layer's weight as autoquant's own layer holds it, in float32."""
    inv = autoquant.inventory(pipe)
    plan = recipe.resolve(inv)
    out = {}
    for layer in inv:
        cfg = plan.configs.get(layer.name)
        if cfg is None or cfg.full_precision:
            continue
        linear = pipe.transformer.get_submodule(layer.path)
        q = get_backend(cfg.method).quantize(linear, cfg, torch.device("cpu"))
        if cfg.method == "torchao":
            w = q.weight.qdata.float() * q.weight.scale.float()
        else:
            w = q.dequantize().float()
        out[layer.path] = w
    return out


def test_int8_layers_are_torchaos_codes_and_scales_bit_for_bit(pipe, tmp_path):
    recipe = _recipe(INT8)
    info = export_comfy(pipe, recipe, tmp_path / "m.safetensors", progress=False)
    assert info["near_exact"] == {} and set(info["formats"]) == {"int8_tensorwise"}
    state = read_comfy(tmp_path / "m.safetensors", pipe.transformer, dtype=torch.float32)
    scored = _scored_weights(pipe, recipe)
    # two double blocks (two 3-in-1 qkv each), two single blocks (4-in-1 linear1)
    assert len(scored) == info["formats"]["int8_tensorwise"] + 2 * 2 * 2 + 2 * 3
    for path, w in scored.items():  # fused q/k/v and the swapped final layer included
        assert torch.equal(state[path + ".weight"], w), path
    # full-precision layers, biases and norms are the model's own
    t = pipe.transformer
    assert torch.equal(state["transformer_blocks.0.norm1.linear.weight"],
                       t.transformer_blocks[0].norm1.linear.weight.float())
    assert torch.equal(state["norm_out.linear.bias"], t.norm_out.linear.bias.float())


def test_the_file_has_comfyuis_flux_keys_shapes_and_comfy_quant(pipe, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    export_comfy(pipe, _recipe(INT8), tmp_path / "m.safetensors", progress=False)
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(tmp_path / "m.safetensors")
    keys, get = set(tensors), tensors.__getitem__
    t = pipe.transformer
    inner = t.config.num_attention_heads * t.config.attention_head_dim
    mlp = t.single_transformer_blocks[0].proj_mlp.out_features
    # ComfyUI's Flux (comfy/ldm/flux): fused qkv and linear1, BFL module names
    assert tuple(get("double_blocks.0.img_attn.qkv.weight").shape) == (3 * inner, inner)
    assert tuple(get("double_blocks.0.img_attn.qkv.weight_scale").shape) == (3 * inner, 1)
    assert tuple(get("single_blocks.0.linear1.weight").shape) == (3 * inner + mlp, inner)
    assert tuple(get("single_blocks.0.linear2.weight").shape) == (inner, inner + mlp)
    for name in ("img_in", "txt_in", "time_in.in_layer", "vector_in.in_layer",
                 "final_layer.linear", "final_layer.adaLN_modulation.1",
                 "single_blocks.0.modulation.lin", "double_blocks.0.img_mlp.0",
                 "double_blocks.0.txt_attn.proj"):
        assert get(f"{name}.weight").dtype == torch.int8, name
        conf = json.loads(bytes(get(f"{name}.comfy_quant").tolist()))
        assert conf == {"format": "int8_tensorwise"}
        assert get(f"{name}.weight_scale").dtype == torch.float32
        assert f"{name}.bias" in keys
    # a full-precision layer has no comfy_quant; norm scales keep BFL names
    assert "double_blocks.0.img_mod.lin.comfy_quant" not in keys
    assert get("double_blocks.0.img_mod.lin.weight").dtype == torch.bfloat16
    assert "double_blocks.0.img_attn.norm.query_norm.scale" in keys
    assert not any(k.startswith(("transformer_blocks", "single_transformer_blocks"))
                   for k in keys)
    saved = autoquant.Recipe.from_dict(__import__("yaml").safe_load(meta["autoquant.recipe"]))
    assert saved.default == _recipe(INT8).default
    assert meta["autoquant.comfyui"] == "0.27.0"


def test_the_loaded_file_makes_the_scored_images(pipe, tmp_path):
    """In float32 ComfyUI's dequantized weights compute what torchao's layers compute (to
    float rounding: torchao scales after its matmul)."""
    p32 = autoquant.load_pipeline("tiny-flux", dtype="float32")
    recipe = _recipe(INT8)
    export_comfy(p32, recipe, tmp_path / "m.safetensors", progress=False)
    loaded = load_comfy(tmp_path / "m.safetensors", p32)
    reference = two_images(p32)
    from_file, scored = file_and_scored(p32, loaded, recipe)
    psnr = lambda a, b: 10 * torch.log10(1 / ((a - b) ** 2).mean()).item()  # noqa: E731
    assert psnr(from_file, scored) >= 60
    assert psnr(scored, reference) < psnr(from_file, scored)  # quantization error dominates


def test_fp8_is_requantized_under_one_scale_and_said_so(pipe, tmp_path):
    from safetensors import safe_open

    recipe = _recipe(FP8)
    info = export_comfy(pipe, recipe, tmp_path / "f.safetensors", progress=False)
    assert set(info["formats"]) == {"float8_e4m3fn"}
    assert len(info["near_exact"]) == 46 and all("near-exact" in v
                                                 for v in info["near_exact"].values())
    with safe_open(str(tmp_path / "f.safetensors"), framework="pt") as f:
        assert f.get_tensor("img_in.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("img_in.weight_scale").shape == ()
        conf = json.loads(bytes(f.get_tensor("img_in.comfy_quant").tolist()))
    assert conf == {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}
    state = read_comfy(tmp_path / "f.safetensors", pipe.transformer, dtype=torch.float32)
    for path, w in _scored_weights(pipe, recipe).items():
        err = ((state[path + ".weight"] - w).norm() / w.norm()).item()
        assert err < 0.05, (path, err)


def test_hqq_4_bit_is_awq_w4a16_only_for_builds_that_have_it(pipe, tmp_path):
    recipe = _recipe(HQQ4)
    with pytest.raises(AutoquantError, match="--comfy-target awq"):
        export_comfy(pipe, recipe, tmp_path / "h.safetensors", progress=False)
    assert not (tmp_path / "h.safetensors").exists()
    info = export_comfy(pipe, recipe, tmp_path / "h.safetensors", target="awq", progress=False)
    assert set(info["formats"]) == {"awq_w4a16"} and info["comfyui"].startswith("a ComfyUI build")
    state = read_comfy(tmp_path / "h.safetensors", pipe.transformer, dtype=torch.float32)
    for path, w in _scored_weights(pipe, recipe).items():
        err = ((state[path + ".weight"] - w).norm() / w.norm()).item()
        assert err < 5e-3, (path, err)  # the same codes; s and z rounded to 16 bits


def test_configs_no_comfyui_format_holds_are_refused_with_the_list(pipe, tmp_path):
    with pytest.raises(AutoquantError, match=r"layer\(s\) use configs no ComfyUI format"):
        export_comfy(pipe, _recipe({"method": "gguf", "type": "Q4_0"}),
                     tmp_path / "g.safetensors", progress=False)
    mixed = _recipe(INT8, **{"re:.*attn\\.to_k$": FP8})
    with pytest.raises(AutoquantError, match="double_blocks.0.img_attn.qkv.weight"):
        export_comfy(pipe, mixed, tmp_path / "g.safetensors", progress=False)
    sd = autoquant.load_pipeline("tiny-sd")
    with pytest.raises(AutoquantError, match="writes Flux denoisers"):
        export_comfy(sd, autoquant.Recipe.from_dict(
            {"format": "autoquant-recipe/1", "components": ["unet"], "default": INT8}),
            tmp_path / "s.safetensors", component="unet", progress=False)
    assert not list(tmp_path.iterdir())


def test_untrusted_files_get_one_clear_line(pipe, tmp_path):
    from safetensors.torch import load_file, save_file

    export_comfy(pipe, _recipe(INT8), tmp_path / "m.safetensors", progress=False)
    good = load_file(tmp_path / "m.safetensors")

    def bad(change, match):
        tensors = dict(good)
        change(tensors)
        save_file(tensors, str(tmp_path / "bad.safetensors"))
        with pytest.raises(AutoquantError, match=match):
            read_comfy(tmp_path / "bad.safetensors", pipe.transformer)

    def fmt(t, conf):
        t["img_in.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)

    bad(lambda t: fmt(t, b'{"format": "__import__(os)"}'), "is not one autoquant reads")
    bad(lambda t: fmt(t, b"not json"), "is not one autoquant reads")
    bad(lambda t: t.update({"img_in.weight": t["img_in.weight"][:, :-1].contiguous()}),
        r"img_in.weight is \(")
    bad(lambda t: t.pop("img_in.weight_scale"), "weight_scale")
    bad(lambda t: t.pop("final_layer.linear.bias"), "lacks final_layer.linear.bias")
    bad(lambda t: t.update({"../evil": torch.zeros(1)}), "has ../evil")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(AutoquantError, match="not a readable safetensors file"):
        read_comfy(tmp_path / "junk.safetensors", pipe.transformer)


def test_linear_bytes_counts_codes_scales_and_biases(pipe, tmp_path):
    info = export_comfy(pipe, _recipe(INT8), tmp_path / "m.safetensors", progress=False)
    inv = [l for l in autoquant.inventory(pipe) if l.component == "transformer"]
    plan = _recipe(INT8).resolve(autoquant.inventory(pipe))
    from autoquant.backends import full_precision

    formula = sum(get_backend(c.method).nbytes(c, l.out_features, l.in_features, l.bias,
                                               l.dtype)
                  for l in inv for c in [plan.configs.get(l.name, full_precision())])
    rows = sum(l.out_features for l in inv
               if not plan.configs.get(l.name, full_precision()).full_precision)
    # torchao's int8 zero points (1 byte a row) are not written; comfy_quant's JSON is
    json_bytes = len(json.dumps({"format": "int8_tensorwise"}))
    assert linear_bytes(tmp_path / "m.safetensors", pipe.transformer) == \
        formula - rows + info["formats"]["int8_tensorwise"] * json_bytes


def test_cli_export_then_evaluate(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(
        "format: autoquant-recipe/1\ncomponents: [transformer]\n"
        "default: {method: torchao, type: int8}\n")
    out = tmp_path / "flux.safetensors"
    assert main(["export", "--model", "tiny-flux", "--recipe", str(tmp_path / "r.yaml"),
                 "--format", "comfy", "--out", str(out), "--no-clip", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fidelity"]["psnr"] > 40 and info["comfyui"] == "0.27.0"
    card = (tmp_path / "README.md").read_text()
    assert "library_name: comfyui" in card and "ComfyUI 0.27.0 or newer" in card
    assert "autoquant evaluate --model tiny-flux --comfy" in card
    assert "the file holds exactly the weights that were scored" in card
    assert main(["evaluate", "--model", "tiny-flux", "--comfy", str(out), "--no-clip",
                 "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["psnr"] == pytest.approx(info["fidelity"]["psnr"], abs=1e-6)
    assert 8 < scored["bits_per_weight"] < 12
    assert main(["export", "--model", "tiny-flux", "--recipe", str(tmp_path / "r.yaml"),
                 "--format", "comfy", "--out", str(out), "--names", "bfl"]) == 2
    assert "do not apply to --format comfy" in capsys.readouterr().err



def test_push_to_hub_uploads_the_file_and_its_card(tmp_path, capsys, monkeypatch):
    """Against a local HTTP server speaking the hub's API (tests/hub_server.py): the real
    huggingface_hub client creates the repository and commits the file, the card and its
    pictures -- nothing else from the folder."""
    from tests.hub_server import FakeHub

    hub = FakeHub()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
        import huggingface_hub.constants as hc

        monkeypatch.setattr(hc, "ENDPOINT", hub.url)
        # the suite runs offline (conftest); this one test talks to the local server only
        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
        (tmp_path / "r.yaml").write_text(
            "format: autoquant-recipe/1\ncomponents: [transformer]\n"
            "default: {method: torchao, type: int8}\n")
        (tmp_path / "notes.txt").write_text("mine, not for the hub")
        out = tmp_path / "flux.safetensors"
        assert main(["export", "--model", "tiny-flux", "--recipe", str(tmp_path / "r.yaml"),
                     "--format", "comfy", "--out", str(out), "--no-clip", "--json",
                     "--push-to-hub", "me/tiny-flux-comfy", "--private"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["hub"]["repo"] == "me/tiny-flux-comfy"
        created = hub.repos["me/tiny-flux-comfy"]
        assert created.get("private") is True or created.get("visibility") == "private", created
        sent = hub.files["me/tiny-flux-comfy"]
        assert set(sent) == {"flux.safetensors", "README.md", "bitmap.png", "images.png"}
        assert sent["flux.safetensors"] == out.read_bytes()
        assert sent["README.md"] == (tmp_path / "README.md").read_bytes()
        assert "library_name: comfyui" in hub.cards[0]  # the hub checked the card's YAML
    finally:
        hub.close()
    assert main(["export", "--model", "tiny-flux", "--recipe", str(tmp_path / "r.yaml"),
                 "--format", "comfy", "--out", str(tmp_path / "x.safetensors"),
                 "--push-to-hub", "not a repo"]) == 2
    assert "owner/name" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
