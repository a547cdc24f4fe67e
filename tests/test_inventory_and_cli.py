"""Layer inventory, pipeline loading (built-in, local folder, hub id) and the CLI."""

from __future__ import annotations

import json

import pytest
import yaml

import autoquant
from autoquant import AutoquantError
from autoquant.cli.commands import main
from autoquant.models.inventory import inventory


def test_inventory_of_a_flux_like_pipeline(tiny_flux_factory):
    pipe = tiny_flux_factory()
    inv = inventory(pipe)
    assert set(inv.components) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    q = inv["transformer.transformer_blocks.0.attn.to_q"]
    assert (q.component, q.path, q.out_features, q.in_features) == (
        "transformer", "transformer_blocks.0.attn.to_q", 64, 64)
    # weight + bias in the dtype the model runs in (--dtype auto: bf16, or float32 on a CPU
    # without bfloat16 instructions)
    assert q.bytes == (64 * 64 + 64) * q.dtype.itemsize
    assert q.dtype == pipe.transformer.dtype
    t = inv.components["transformer"]
    assert t["linear_layers"] == sum(1 for l in inv if l.component == "transformer")
    assert t["linear_params"] == sum(l.params for l in inv if l.component == "transformer")
    # layers that cannot take a config are marked, with the reason -- never silently dropped
    usable = inv.usability(inv["text_encoder.encoder.layers.0.mlp.fc2"])
    assert usable["hqq4-g64"] == "in_features=96 is not divisible by group_size=64"
    assert usable["bnb4-nf4"] is None
    assert usable["torchao-int4-g64"] is not None


def test_local_folder_round_trip(tiny_sd_factory, tmp_path):
    pipe = tiny_sd_factory()
    pipe.save_pretrained(tmp_path / "sd")
    loaded = autoquant.load_pipeline(str(tmp_path / "sd"))
    assert inventory(loaded).fingerprint() == inventory(pipe).fingerprint()


def test_unreachable_hub_id_and_bad_folder_say_what_to_do(tmp_path):
    with pytest.raises(AutoquantError, match="(?s)could not load 'nobody/no-such-model'.*built-in"):
        autoquant.load_pipeline("nobody/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AutoquantError, match="no model_index.json"):
        autoquant.load_pipeline(str(tmp_path / "empty"))


def test_cli_inspect_json(capsys):
    assert main(["inspect", "--model", "tiny-sd", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fingerprint"].startswith("sha256:")
    assert len(data["layers"]) == sum(c["linear_layers"] for c in data["components"].values())
    assert any(l["unusable"] for l in data["layers"])


def test_cli_inspect_table(capsys):
    assert main(["inspect", "--model", "tiny-flux"]) == 0
    out = capsys.readouterr().out
    assert "transformer.single_transformer_blocks.1.proj_out" in out
    assert "text_encoder_2" in out and "fingerprint" in out


def test_cli_apply_saves_and_writes_an_image(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"format": "autoquant-recipe/1", "components": ["unet"],
                                      "default": {"method": "hqq", "bits": 4}}))
    code = main(["apply", "--model", "tiny-sd", "--recipe", str(recipe), "--save",
                 str(tmp_path / "q"), "--prompt", "a dark coat", "--size", "32", "--steps", "2",
                 "--out", str(tmp_path / "img.png"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    summary = result["summary"]
    assert summary["layers_quantized"] + len(summary["skipped"]) == 50
    assert summary["bytes_after"] == summary["predicted_bytes_after"]
    assert (tmp_path / "img.png").stat().st_size > 0
    assert (tmp_path / "q" / "quantized.safetensors").is_file()


def test_cli_bad_recipe_exits_2_with_every_problem(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"format": "autoquant-recipe/1",
                                      "layers": {"a": {"method": "hqq", "bits": 5},
                                                 "b": {"method": "zzz"}}}))
    assert main(["apply", "--model", "tiny-sd", "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and "a: hqq: bits=5" in err and "b: unknown method 'zzz'" in err
