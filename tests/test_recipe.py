"""Recipes: round trip, precedence, and a clear error for every kind of bad input."""

from __future__ import annotations

import pytest
import yaml

import autoquant
from autoquant import Recipe, RecipeError, load_recipe
from autoquant.backends import config_from_dict
from autoquant.models.inventory import inventory

MINIMAL = """
format: autoquant-recipe/1
default: {method: hqq, bits: 4, group_size: 64}
layers:
  transformer.transformer_blocks.0.attn.to_q: {method: hqq, bits: 3, group_size: 64}
  "re:transformer\\\\.single_transformer_blocks\\\\.\\\\d+\\\\.proj_out": {method: bnb, bits: 4, type: nf4}
  transformer.proj_out: {method: none}
"""


@pytest.fixture(scope="module")
def flux_inv(tiny_flux_factory):
    return inventory(tiny_flux_factory())


def test_minimal_form_from_the_issue_loads(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL)
    recipe = load_recipe(path)
    assert recipe.default == config_from_dict({"method": "hqq", "bits": 4, "group_size": 64})
    assert recipe.layers["transformer.proj_out"].method == "none"
    assert recipe.layers[r"re:transformer\.single_transformer_blocks\.\d+\.proj_out"].type == "nf4"


def test_round_trip_recipe_yaml_recipe_is_equal(tmp_path):
    recipe = Recipe.from_dict(yaml.safe_load(MINIMAL))
    recipe.model = {"id": "tiny-flux", "fingerprint": "sha256:0123"}
    recipe.components = ["transformer"]
    recipe.metrics = {"psnr": 31.5, "bytes": 12345}
    recipe.provenance = {"autoquant": autoquant.__version__, "trial": 7}
    recipe.budget = "35%"
    recipe.layers["x.y"] = config_from_dict({"method": "torchao", "type": "intx", "bits": 3})
    recipe.layers["x.z"] = config_from_dict({"method": "bnb", "bits": 8, "threshold": 6})
    path = recipe.save(tmp_path / "r.yaml")
    again = load_recipe(path)
    assert again == recipe
    assert again.to_yaml() == recipe.to_yaml()
    assert "!!python" not in path.read_text()  # plain data, never a pickle


def test_precedence_exact_then_first_regex_then_default(flux_inv):
    recipe = Recipe.from_dict({
        "format": "autoquant-recipe/1",
        "components": ["transformer"],
        "default": {"method": "hqq", "bits": 4},
        "layers": {
            "re:transformer\\.transformer_blocks\\.0\\.attn\\..*": {"method": "hqq", "bits": 2},
            "re:transformer\\.transformer_blocks\\..*": {"method": "hqq", "bits": 8},
            "transformer.transformer_blocks.0.attn.to_q": {"method": "hqq", "bits": 3},
        }})
    plan = recipe.resolve(flux_inv).configs
    assert plan["transformer.transformer_blocks.0.attn.to_q"].bits == 3  # exact
    assert plan["transformer.transformer_blocks.0.attn.to_k"].bits == 2  # first regex in order
    assert plan["transformer.transformer_blocks.1.attn.to_k"].bits == 8  # second regex
    assert plan["transformer.proj_out"].bits == 4  # default
    assert not any(n.startswith("text_encoder") for n in plan)  # default limited to components
    # the default cannot take x_embedder (in_features 16): kept, and said so
    assert "transformer.x_embedder" in recipe.resolve(flux_inv).skipped


BAD_CONFIGS = [
    ({"method": "awq", "bits": 4}, "unknown method 'awq'"),
    ({"method": "hqq", "bits": 5}, "bits=5 is not supported"),
    ({"method": "hqq", "bits": 4, "group_size": 60}, "multiple of 8"),
    ({"method": "hqq", "bits": 4, "axis": 0}, "unknown option(s) ['axis']"),
    ({"method": "bnb", "bits": 4, "type": "nf3"}, "type='nf3' is not supported"),
    ({"method": "bnb", "bits": 8, "double_quant": True}, "double_quant applies to 4 bit only"),
    ({"method": "torchao", "type": "int8", "bits": 4}, "bits=4 is not supported"),
    ({"method": "torchao", "type": "intx"}, "needs bits"),
    ({"method": "torchao", "type": "int8", "group_size": 64}, "group_size does not apply"),
    ({"bits": 4}, "missing 'method'"),
    ({"method": "hqq", "bits": "4"}, "bits must be an integer"),
]


@pytest.mark.parametrize("entry,message", BAD_CONFIGS, ids=lambda v: str(v)[:40])
def test_bad_config_gives_a_clear_error(entry, message):
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict({"format": "autoquant-recipe/1", "layers": {"some.layer": entry}})
    assert message in str(info.value)
    assert "some.layer" in str(info.value)


def test_every_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({
        "format": "autoquant-recipe/2", "extra": 1,
        "default": {"method": "hqq", "bits": 7},
        "layers": {"a": {"method": "nope"}, "b": {"method": "bnb", "bits": 3},
                   "re:(": {"method": "none"}}}))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = str(info.value)
    assert len(info.value.problems) == 6, text
    for part in ("format must be", "unknown top-level key", "default:", "a: unknown method",
                 "b: bnb: bits=3", "re:(: bad regex", str(path)):
        assert part in text


def test_not_a_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match="no recipe file"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "x.yaml").write_text("format: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "x.yaml")
    (tmp_path / "y.yaml").write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="a recipe is a mapping"):
        load_recipe(tmp_path / "y.yaml")
    # a pickle smuggled into YAML is refused by the safe loader
    (tmp_path / "z.yaml").write_text("format: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "z.yaml")


def _resolve_problems(inv, layers, **extra):
    recipe = Recipe.from_dict({"format": "autoquant-recipe/1", "layers": layers, **extra})
    with pytest.raises(RecipeError) as info:
        recipe.resolve(inv)
    return info.value.problems


def test_model_dependent_problems_are_all_reported(flux_inv):
    problems = _resolve_problems(flux_inv, {
        "transformer.transformer_blocks.0.attn.to_qq": {"method": "hqq", "bits": 4},
        "re:transformer\\.nothing\\..*": {"method": "hqq", "bits": 4},
        "transformer.x_embedder": {"method": "hqq", "bits": 4, "group_size": 64},
        "text_encoder.encoder.layers.0.mlp.fc2": {"method": "hqq", "bits": 4},
    }, model={"id": "other", "fingerprint": "sha256:deadbeef"}, components=["unet"])
    text = "\n".join(problems)
    assert len(problems) == 6, text
    assert "no such quantizable layer (did you mean transformer.transformer_blocks.0.attn.to_q?)" in text
    assert "regex matches no quantizable layer" in text
    assert "in_features=16 is not divisible by group_size=64" in text
    assert "in_features=96 is not divisible by group_size=64" in text
    assert "fingerprint sha256:deadbeef does not match" in text
    assert "components: no component 'unet'" in text


def test_fingerprint_of_the_same_model_matches(flux_inv, tiny_flux_factory):
    assert inventory(tiny_flux_factory()).fingerprint() == flux_inv.fingerprint()
    recipe = Recipe.from_dict({"format": "autoquant-recipe/1",
                               "model": {"fingerprint": flux_inv.fingerprint()},
                               "default": {"method": "hqq", "bits": 4}})
    assert recipe.resolve(flux_inv).configs


def test_a_plans_predicted_bytes_are_the_measured_bytes_after_applying():
    """``Plan.nbytes`` (what the CLI and the memory planner use) is what the applied layers hold,
    every scale and packed code counted; an empty recipe predicts full precision."""
    import autoquant
    from autoquant.backends.measure import measured_bytes

    pipe = autoquant.load_pipeline("tiny-flux", dtype="auto")
    inv = autoquant.inventory(pipe)
    full = autoquant.Recipe().resolve(inv)
    assert full.nbytes(["transformer"]) == measured_bytes(pipe.transformer)
    assert full.fp_share(["transformer"]) == 1.0
    recipe = autoquant.Recipe.from_dict({
        "format": "autoquant-recipe/1", "components": ["transformer"],
        "default": {"method": "hqq", "bits": 4, "group_size": 32},
        "layers": {"re:transformer\\..*ff\\.net\\.0\\.proj": {"method": "bnb", "bits": 4},
                   "re:transformer\\..*attn\\.to_v": {"method": "none"}}})
    plan = recipe.resolve(inv)
    predicted = plan.nbytes(["transformer"])
    autoquant.apply_recipe(pipe, recipe, progress=False)
    assert predicted == measured_bytes(pipe.transformer) < full.nbytes(["transformer"])
    assert 0 < plan.fp_share(["transformer"]) < 0.2
