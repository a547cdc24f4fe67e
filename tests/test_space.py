"""Search spaces mean what they say, or are refused: patterns follow the recipes' rule, every
entry must do something on the model, objectives are the study's objectives."""

from __future__ import annotations

import optuna
import pytest
import yaml

import autoquant
from autoquant import SpaceError
from autoquant.search import Search, SearchConfig, run_search
from autoquant.search._groups import Groups
from autoquant.generation.settings import EvalSettings
from autoquant.search.space import SearchSpace, load_space

BASE = {"format": "autoquant-space/1",
        "candidates": [{"method": "hqq", "bits": 4, "group_size": 32},
                       {"method": "hqq", "bits": 8, "group_size": 32}, {"method": "none"}]}
ATTN = "transformer\\.transformer_blocks\\.0\\.attn"


@pytest.fixture(scope="module")
def inv():
    return autoquant.inventory(autoquant.load_pipeline("tiny-flux", dtype="auto"))


def groups(inv, **entries) -> Groups:
    return Groups.build(inv, SearchSpace.from_dict({**BASE, **entries}), ["transformer"])


def test_a_tie_written_with_re_ties_its_layers(inv):
    g = groups(inv, tie=[f"re:({ATTN})\\.to_[qkv]"])
    tied = [x for x in g.groups if x.name.startswith("tie:")]
    assert [sorted(l.name.rsplit(".", 1)[1] for l in x.layers) for x in tied] == \
        [["to_k", "to_q", "to_v"]]


def test_a_tie_with_two_groups_ties_one_layer_position_across_the_blocks_of_a_kind(inv):
    # what a compiled plan wants: every block of a kind alike, one graph per kind
    g = groups(inv, tie=["re:(transformer\\.(?:single_)?transformer_blocks)\\.\\d+\\.(.*)"])
    tied = {x.name: sorted(l.name for l in x.layers) for x in g.groups if x.name.startswith("tie:")}
    blocks = {n.split(".")[1] for n in (l.name for l in inv) if "_blocks." in n}
    assert blocks == {"transformer_blocks", "single_transformer_blocks"}
    for key, members in tied.items():
        kind, position = key[len("tie:"):].split("*")
        assert members == sorted(l.name for l in inv if l.name.startswith(kind + ".")
                                 and l.name.split(".", 3)[3] == position)
    n_blocks = {k: len({n.split(".")[2] for n in (l.name for l in inv) if n.split(".")[1] == k})
                for k in blocks}
    assert all(len(m) == n_blocks[k.split("*")[0].split(".")[1]] for k, m in tied.items())
    assert min(n_blocks.values()) >= 2  # (else nothing was tied)
    # a layer position of double blocks is not tied with the same position of single ones
    assert any(k.endswith("*attn.to_q") and "single" in k for k in tied)
    assert any(k.endswith("*attn.to_q") and "single" not in k for k in tied)


def test_a_tie_without_re_or_without_a_group_is_refused():
    for entry, part in ((f"({ATTN})\\.to_[qkv]", "is an exact name, which ties nothing"),
                        (f"re:{ATTN}\\.to_[qkv]", "has no group"), (3, "must be a non-empty list")):
        with pytest.raises(SpaceError, match=part):
            SearchSpace.from_dict({**BASE, "tie": [entry]})


def test_protect_follows_the_recipe_rule_exact_name_or_re(inv):
    exact = groups(inv, protect=["transformer.proj_out"])
    assert [l.name for l in exact.fixed if l.name == "transformer.proj_out"]
    regex = groups(inv, protect=["re:transformer\\.proj_.*"])
    assert "transformer.proj_out" in {l.name for l in regex.fixed}
    # a regex-looking entry without re: is an exact name, which names no layer: refused
    with pytest.raises(SpaceError, match="protect: 'transformer.proj_.\\*' matches no layer"):
        groups(inv, protect=["transformer.proj_.*"])


def test_entries_that_would_do_nothing_are_refused_together(inv):
    with pytest.raises(SpaceError) as info:
        Groups.build(inv, SearchSpace.from_dict({**BASE, "tie": ["re:(nothing)\\.here"],
                                                 "protect": ["re:nope.*"]}),
                     ["transformer", "unet"])
    text = str(info.value)
    assert "3 problems" in text
    for part in ("no component 'unet'", "tie: 're:(nothing)\\\\.here' matches no layer",
                 "protect: 're:nope.*' matches no layer"):
        assert part in text


def test_components_must_be_a_list_of_names():
    for bad in ("transformer", [], [1], ["transformer", "transformer"]):
        with pytest.raises(SpaceError, match="components"):
            SearchSpace.from_dict({**BASE, "components": bad})


def test_a_space_lists_every_problem_and_refuses_repeated_keys(tmp_path):
    with pytest.raises(SpaceError) as info:
        SearchSpace.from_dict({**BASE, "objectives": ["psnr", "latency"], "fp_cap": "x",
                               "max_bits_per_weight": True, "tie": [None]})
    assert len(info.value.problems) >= 4
    path = tmp_path / "s.yaml"
    path.write_text("format: autoquant-space/1\nfp_cap: 0.1\ncandidates: [{method: none}]\n"
                    "fp_cap: 0.2\n")
    with pytest.raises(SpaceError, match="key 'fp_cap' appears twice \\(lines 2 and 4\\)"):
        load_space(path)


def test_objectives_are_the_studys_objectives(tmp_path):
    pipe = autoquant.load_pipeline("tiny-flux", dtype="auto")
    space = SearchSpace.from_dict({**BASE, "objectives": ["bytes", "ssim", "psnr"]})
    settings = EvalSettings.for_model("tiny-flux", "search", seeds=[0], batch_size=8)
    search = Search(SearchConfig(model="tiny-flux", budget="50%", space=space, trials=3,
                                 out=tmp_path, settings=settings, clip=None, progress=False), pipe)
    report = run_search(search)
    study = optuna.load_study(study_name=report["study"],
                              storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert study.metric_names == ["bytes", "ssim", "psnr"]
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE", "MAXIMIZE"]
    best = max((t for t in study.trials if t.state.name == "COMPLETE"),
               key=lambda t: (t.values[1], t.values[2]))
    assert report["best"]["trial"] == best.number  # best = highest SSIM, the first quality one
    assert set(report["best"]) >= {"ssim", "psnr"}


def test_every_shipped_space_round_trips_through_its_yaml_form():
    for name in ("default", "hqq-only", "low-bit", "flux", "sd3", "sdxl"):
        space = load_space(name)
        again = SearchSpace.from_dict(yaml.safe_load(yaml.safe_dump(space.to_dict())), name)
        assert again == space
