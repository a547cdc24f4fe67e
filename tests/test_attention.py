"""``autoquant.set_attention`` / ``apply --attention``: the denoiser's attention kernel through
diffusers' dispatcher, validated before anything changes."""

from __future__ import annotations

import json

import pytest
import torch

import autoquant
from autoquant.runtime.attention import ATTENTION_BACKENDS


@pytest.fixture(autouse=True)
def restore_active_backend():
    """diffusers' set_attention_backend also moves its process-wide default: put it back."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry._active_backend = before


def _backends(module):
    return {getattr(m.processor, "_attention_backend", "absent") for m in module.modules()
            if getattr(m, "processor", None) is not None}


def _step(pipe):
    t = pipe.transformer
    gen = torch.Generator().manual_seed(0)
    cfg = t.config
    tokens = 16
    kw = dict(hidden_states=torch.randn(1, tokens, cfg.in_channels, generator=gen),
              encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, generator=gen),
              pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=gen),
              timestep=torch.full((1,), 0.5), img_ids=torch.zeros(tokens, 3),
              txt_ids=torch.zeros(8, 3), return_dict=False)
    if cfg.guidance_embeds:
        kw["guidance"] = torch.full((1,), 3.5)
    with torch.no_grad():
        return t(**{k: v.to(t.dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                    for k, v in kw.items()})[0]


def test_math_attention_runs_the_same_step(tiny_flux_factory):
    pipe = tiny_flux_factory()
    native = _step(pipe)
    assert autoquant.set_attention(pipe, "math") == ["transformer"]
    assert _backends(pipe.transformer) == {ATTENTION_BACKENDS["math"]}
    # the unfused reference: the same attention within float rounding, not bit for bit
    torch.testing.assert_close(_step(pipe), native, atol=1e-4, rtol=1e-3)
    autoquant.set_attention(pipe, "native")
    assert _backends(pipe.transformer) == {"native"}
    assert torch.equal(_step(pipe), native)


def test_diffusers_names_pass_through(tiny_flux_factory):
    pipe = tiny_flux_factory()
    autoquant.set_attention(pipe, "_native_math")
    assert _backends(pipe.transformer) == {"_native_math"}


@pytest.mark.parametrize("backend, fragment", [
    ("fast", "choose one of native, cudnn"),
    ("cudnn", "runs on CUDA"),
    ("flash", "runs on CUDA"),
])
def test_bad_backends_change_nothing(tiny_flux_factory, backend, fragment):
    pipe = tiny_flux_factory()
    before = _backends(pipe.transformer)
    with pytest.raises(autoquant.InputError, match=fragment):
        autoquant.set_attention(pipe, backend)
    assert _backends(pipe.transformer) == before


def test_models_outside_the_dispatcher_are_refused(tiny_sd_factory):
    pipe = tiny_sd_factory()
    with pytest.raises(autoquant.InputError, match="does not route its attention"):
        autoquant.set_attention(pipe, "math")


def test_unknown_component_is_refused(tiny_flux_factory):
    with pytest.raises(autoquant.InputError, match="no component"):
        autoquant.set_attention(tiny_flux_factory(), "math", components=["unet"])


def test_cli_apply_sets_attention(tmp_path, capsys):
    from autoquant.cli.commands import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("format: autoquant-recipe/1\ndefault:\n  method: hqq\n  bits: 8\n")
    assert main(["apply", "--model", "tiny-flux", "--recipe", str(recipe), "--attention", "math",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["attention"] == "math"
