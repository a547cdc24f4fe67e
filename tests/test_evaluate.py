"""Scoring: settings, the reference cache, metrics, the Evaluator, baselines and their CLI."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import autoquant
from autoquant import AutoquantError, Recipe
from autoquant.scoring.baseline import baseline_recipe, protected_layers
from autoquant.backends import config_from_dict
from autoquant.scoring.clip import load_clip
from autoquant.cli.commands import main
from autoquant.scoring.evaluator import Evaluator
from autoquant.scoring.metrics import aggregate, pixel_metrics
from autoquant.scoring.references import ReferenceCache, model_key
from autoquant.generation.settings import EvalSettings, prompt_set

HQQ2 = {"format": "autoquant-recipe/1", "components": ["transformer"],
        "default": {"method": "hqq", "bits": 2}}
HQQ8 = {"format": "autoquant-recipe/1", "components": ["transformer"],
        "default": {"method": "hqq", "bits": 8}}


@pytest.fixture(scope="module")
def demo():
    return autoquant.load_pipeline("demo")


@pytest.fixture()
def small_settings():
    s = EvalSettings.for_model("demo", "holdout", seeds=[7], batch_size=4)
    return EvalSettings(**{**s.__dict__, "prompts": s.prompts[:4]})


def test_every_image_of_a_set_starts_from_its_own_noise(demo, small_settings):
    """Prompts of one seed do not share a starting latent, an image is the same in any batch,
    and a plain diffusers call with ``noise_seed`` reproduces it."""
    from autoquant.scoring.evaluator import generate_images

    pairs = small_settings.pairs()[:3]
    seeds = {autoquant.noise_seed(p, s) for p, s in pairs}
    assert len(seeds) == 3 and len({s for _, s in pairs}) == 1
    together = generate_images(demo, small_settings, pairs)
    alone = generate_images(demo, small_settings, pairs[1:2])
    close = lambda a, b: (a - b).abs().max() < 0.02  # noqa: E731  (bf16 matmuls per batch size)
    assert close(together[1], alone[0])
    prompt, seed = pairs[2]
    plain = demo(prompt, generator=torch.Generator("cpu").manual_seed(
        autoquant.noise_seed(prompt, seed)), output_type="pt",
        **small_settings.pipeline_kwargs()).images.float()
    assert close(together[2], plain[0])
    # the bare seed (every prompt's old noise) would give another image
    bare = demo(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="pt",
                **small_settings.pipeline_kwargs()).images.float()
    assert (together[2] - bare[0]).abs().mean() > 0.02


def test_prompt_sets_are_disjoint_and_settings_key_ignores_batching():
    assert not set(prompt_set("demo", "search")) & set(prompt_set("demo", "holdout"))
    assert not set(prompt_set("some/model", "search")) & set(prompt_set("some/model", "holdout"))
    a = EvalSettings.for_model("demo", batch_size=2)
    b = EvalSettings.for_model("demo", batch_size=16)
    assert a.image_key() == b.image_key()
    assert EvalSettings.for_model("demo", steps=20).image_key() != a.image_key()
    assert EvalSettings.for_model("demo", guidance=5.0).image_key() != a.image_key()
    with pytest.raises(AutoquantError, match="no prompts file"):
        EvalSettings.for_model("demo", prompts_file="/nonexistent.txt")


def test_pixel_metrics():
    a = torch.rand(3, 3, 32, 32)
    b = (a + 0.01).clamp(0, 1)
    m = pixel_metrics(a, a)
    assert torch.isinf(m["psnr"]).all() and torch.allclose(m["ssim"], torch.ones(3))
    m = pixel_metrics(b, a)
    mse = (b - a).pow(2).flatten(1).mean(1)
    assert torch.allclose(m["psnr"], 10 * torch.log10(1 / mse), atol=1e-3)
    agg = aggregate(m)
    assert agg["psnr"]["worst"] == pytest.approx(m["psnr"].min().item())


def test_references_are_cached_and_keyed_by_model_and_settings(demo, small_settings, tmp_path):
    cache = ReferenceCache(tmp_path)
    first = Evaluator(demo, small_settings, clip=None, cache=cache, progress=False)
    assert first.references_generated == 4
    again = Evaluator(demo, small_settings, clip=None, cache=cache, progress=False)
    assert again.references_generated == 0
    assert torch.equal(again.references, first.references)
    other = EvalSettings(**{**small_settings.__dict__, "steps": 6})
    assert Evaluator(demo, other, clip=None, cache=cache, progress=False).references_generated == 4
    # a different checkpoint of the same architecture is a different model
    changed = autoquant.load_pipeline("demo")
    with torch.no_grad():
        changed.transformer.proj_out.weight.mul_(1.01)
    assert model_key(changed) != model_key(demo)


def test_evaluate_full_precision_and_recipes(demo, small_settings, tmp_path):
    clip = load_clip("demo")
    ev = Evaluator(demo, small_settings, clip=clip, cache=ReferenceCache(tmp_path), progress=False)
    fp = ev.evaluate()
    assert fp.metrics["psnr"]["mean"] == float("inf")
    assert fp.metrics["clip_fidelity"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert fp.fp_share == 1.0 and fp.bytes == fp.fp_bytes
    hi = ev.evaluate(Recipe.from_dict(HQQ8))
    lo = ev.evaluate(Recipe.from_dict(HQQ2))
    assert hi.metrics["psnr"]["mean"] > lo.metrics["psnr"]["mean"] + 10
    assert hi.metrics["clip_fidelity"]["mean"] > lo.metrics["clip_fidelity"]["mean"]
    assert lo.bytes < hi.bytes < fp.bytes
    # 2-bit codes + a scale and a zero point (layer dtype) per group of 64, + small layers kept
    dtype_bits = demo.transformer.dtype.itemsize * 8
    assert 2 < lo.bits_per_weight < 2 + 2 * dtype_bits / 64 + 0.5 and lo.fp_share == 0
    # the pipeline is back in full precision, and the numbers repeat exactly on the CPU
    assert type(demo.transformer.proj_out) is torch.nn.Linear
    again = ev.evaluate(Recipe.from_dict(HQQ2))
    assert again.metrics == lo.metrics
    d = lo.to_dict()
    for key in ("bytes", "bits_per_weight", "fp_share", "psnr", "ssim", "clip_fidelity",
                "clip_score", "latency_s"):
        assert key in d
    assert set(d["timing"]) >= {"generation_s", "metrics_s", "apply_s", "overhead_s"}


def test_nan_images_are_an_error_not_a_score(demo, small_settings, tmp_path, monkeypatch):
    ev = Evaluator(demo, small_settings, clip=None, cache=ReferenceCache(tmp_path), progress=False)
    import autoquant.scoring.evaluator as E

    real = E._generate
    monkeypatch.setattr(E, "_generate", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(AutoquantError, match="non-finite"):
        ev.evaluate(Recipe.from_dict(HQQ8))
    assert type(demo.transformer.proj_out) is torch.nn.Linear  # reverted even so


def test_baseline_protects_embedders_and_final_projection(demo):
    inv = autoquant.inventory(demo)
    names = protected_layers(inv, ["transformer"])
    assert "transformer.proj_out" in names and "transformer.adaln_single.linear" in names
    assert not any(".transformer_blocks." in n for n in names)
    cfg = config_from_dict({"method": "bnb", "bits": 4})
    recipe = baseline_recipe(inv, cfg, ["transformer"], "default", {"id": "demo"})
    plan = recipe.resolve(inv)
    assert {n for n, c in plan.configs.items() if c.method == "none"} == set(names)
    assert len(plan.configs) == sum(1 for l in inv if l.component == "transformer")


def test_cli_baseline_then_evaluate_json(tmp_path, capsys):
    out = tmp_path / "nf4.yaml"
    assert main(["baseline", "--model", "demo", "--method", "bnb", "--bits", "4", "--options",
                 "type=fp4", "--protect", "default", "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["type"] == "fp4" and 0 < info["fp_share"] < 0.2
    assert yaml.safe_load(out.read_text())["default"]["type"] == "fp4"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a bag\na drawing of a sandal\n")
    assert main(["evaluate", "--model", "demo", "--recipe", str(out), "--prompts", str(prompts),
                 "--seeds", "0", "--cache-dir", str(tmp_path / "refs"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 2 and result["references_generated"] == 2
    assert 10 < result["psnr"] < 60 and 0.5 < result["clip_fidelity"] <= 1


def test_cli_errors(tmp_path, capsys):
    assert main(["baseline", "--model", "demo", "--method", "hqq", "--bits", "5", "--out",
                 str(tmp_path / "x.yaml")]) == 2
    assert "bits=5 is not supported" in capsys.readouterr().err
    assert main(["evaluate", "--model", "tiny-sd", "--seeds", "0"]) == 2
    assert "--no-clip" in capsys.readouterr().err


def test_model_key_is_stable_across_processes():
    import subprocess
    import sys

    code = ("import autoquant; from autoquant.scoring.references import model_key; "
            "print(model_key(autoquant.load_pipeline('tiny-sd', dtype='auto')))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.strip().splitlines()[-1]
    assert other == model_key(autoquant.load_pipeline("tiny-sd", dtype="auto"))
