"""Step time as a searched quantity: limits, the per-layer table and its cache, calibration, the
latency objective and constraint in a search, compiled execution."""

from __future__ import annotations

import json

import pytest
import torch

import autoquant
from autoquant import InputError
from autoquant.backends import config_from_dict
from autoquant.runtime.latency import MODES, LatencyModel, LatencyTable, LayerShape, parse_latency

HQQ4 = config_from_dict({"method": "hqq", "bits": 4, "group_size": 32})


def test_parse_latency():
    assert parse_latency("1.0x") == ("relative", 1.0)
    assert parse_latency("150ms") == ("seconds", 0.15)
    assert parse_latency("0.2s") == ("seconds", 0.2)
    for bad in ("fast", "0x", "-1ms", "10"):
        with pytest.raises(InputError, match="latency"):
            parse_latency(bad)


def test_the_table_is_cached_per_device_and_verified(tmp_path):
    path = tmp_path / "table.json"
    shape = LayerShape(64, 128, True, "bfloat16", 16)
    table = LatencyTable(torch.device("cpu"), "eager", path, repeats=3)
    t = table.seconds(shape, HQQ4)
    assert t > 0 and table.measured == 1
    table.save()
    again = LatencyTable(torch.device("cpu"), "eager", path)
    assert again.seconds(shape, HQQ4) == t and again.measured == 0  # read, not re-measured
    data = json.loads(path.read_text())
    data["entries"][next(iter(data["entries"]))] = 0.0  # tampered: the checksum says so
    path.write_text(json.dumps(data))
    assert LatencyTable(torch.device("cpu"), "eager", path).entries == {}


def test_a_compiled_table_is_not_reused_under_other_inductor_tuning(tmp_path, monkeypatch):
    """Coordinate descent tuning (what torchao's defaults switch on) picks other kernels: the
    compiled table timed under it must not be read without it. Eager tables do not care."""
    from torch._inductor import config as inductor

    monkeypatch.setenv("AUTOQUANT_CACHE", str(tmp_path))
    paths = {}
    for tuning in (False, True):
        with inductor.patch(coordinate_descent_tuning=tuning):
            paths[tuning] = {m: LatencyTable(torch.device("cpu"), m).path for m in MODES}
    assert paths[False]["compile"] != paths[True]["compile"]
    assert paths[False]["eager"] == paths[True]["eager"]
    assert all(p.parent == tmp_path / "latency" for d in paths.values() for p in d.values())


def test_calibration_makes_a_uniform_plan_predict_its_measured_step(tmp_path):
    table = LatencyTable(torch.device("cpu"), "eager", tmp_path / "t.json")
    shape = LayerShape(64, 128, False, "bfloat16", 16)
    none = config_from_dict({"method": "none"})
    table.entries = {f"{shape.key}|{HQQ4.label}": 3e-4, f"{shape.key}|{none.label}": 1e-4}
    model = LatencyModel(table, {"a": [shape], "b": [shape]}, fp_step_s=0.01)
    assert model.predict({"a": HQQ4, "b": HQQ4}) == pytest.approx(0.0104)
    factor = model.calibrate(HQQ4, ["a", "b"], measured_step_s=0.0102)
    assert factor == pytest.approx(0.5)
    assert model.predict({"a": HQQ4, "b": HQQ4}) == pytest.approx(0.0102)
    assert model.predict({"a": HQQ4, "b": none}) == pytest.approx(0.0101)


def test_calibration_with_noisy_deltas_of_mixed_signs_stays_between_the_measured_steps(tmp_path):
    """Tiny layers on a CPU: per-shape deltas of both signs (timing noise). Scaling them to the
    uniform plan's step once predicted a negative step for a mixed plan; the measured difference
    is shared out instead, so every plan lies between full precision and the uniform plan."""
    table = LatencyTable(torch.device("cpu"), "eager", tmp_path / "t.json")
    small, big = LayerShape(64, 128, False, "bfloat16", 16), LayerShape(64, 256, False, "bfloat16", 16)
    none = config_from_dict({"method": "none"})
    table.entries = {f"{small.key}|{HQQ4.label}": 5e-4, f"{small.key}|{none.label}": 1e-4,
                     f"{big.key}|{HQQ4.label}": 1e-4, f"{big.key}|{none.label}": 4.5e-4}
    model = LatencyModel(table, {"a": [small], "b": [big]}, fp_step_s=0.001)
    assert model.calibrate(HQQ4, ["a", "b"], measured_step_s=0.0011) == 1.0  # shared, not scaled
    assert model.predict({"a": HQQ4, "b": HQQ4}) == pytest.approx(0.0011)
    for plan in ({"a": HQQ4, "b": none}, {"a": none, "b": HQQ4}):
        assert 0.001 <= model.predict(plan) <= 0.0011
    assert model.shares[HQQ4.label]["a"] == pytest.approx(1e-4 * 5 / 6)  # by time under hqq4


def test_a_latency_limit_binds_the_solver_and_every_trial_records_both_latencies(tmp_path):
    from autoquant.search import Search, SearchConfig, run_search
    from autoquant.generation.settings import EvalSettings

    pipe = autoquant.load_pipeline("tiny-flux", dtype="auto")
    space = autoquant.load_space("hqq-only")
    settings = EvalSettings.for_model("tiny-flux", "search", seeds=[0])
    def search_with(latency, out):
        return Search(SearchConfig(model="tiny-flux", budget="60%", space=space, trials=5,
                                   out=out, settings=settings, clip=None, progress=False,
                                   sensitivity="anchored", latency=latency), pipe)

    # on a CPU every quantized layer is slower than bf16: full precision's speed is out of reach
    with pytest.raises(InputError, match=r"cannot be met within the budget: the fastest plan"):
        search_with("0.5x", tmp_path / "impossible").prepare()
    search = search_with("1.6x", tmp_path)
    assert search.objectives[-1] == "latency"
    report = run_search(search)
    limit = search.budget.latency_limit_s
    assert limit == pytest.approx(1.6 * search.budget.fp_step_s)
    import optuna

    trials = optuna.load_study(study_name=report["study"],
                               storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    solver = [t for t in trials if t.user_attrs.get("source", "").startswith("solver@")]
    assert solver and all(t.user_attrs["predicted_latency_s"] <= limit * 1.000001
                          for t in solver)
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert all(t.user_attrs["measured_latency_s"] > 0 for t in done)
    assert all(t.values[-1] == t.user_attrs["predicted_latency_s"] for t in done)
    if "best" in report:
        assert report["best"]["latency"] <= limit * 1.000001


def test_compile_pipeline_compiles_the_denoiser_only(tiny_sd_factory):
    pipe = tiny_sd_factory()
    assert autoquant.compile_pipeline(pipe) == ["unet"]
    assert pipe.unet._compiled_call_impl is not None  # compiled at its next call
    assert pipe.vae._compiled_call_impl is None
    with pytest.raises(InputError, match="no component"):
        autoquant.compile_pipeline(pipe, ["transformer"])


def test_a_flux_denoiser_compiles_block_by_block_one_graph_per_block_variant(tiny_flux_factory):
    """Regional compilation: identical blocks share a graph, a block with other layer types
    compiles its own; none falls back to eager, and the images match the eager ones."""
    from torch._dynamo.utils import counters

    from autoquant.runtime.compile import regions
    from tests.helpers import generate

    pipe = tiny_flux_factory()
    blocks = regions(pipe.transformer)
    assert {type(b).__name__ for b in blocks} == set(pipe.transformer._repeated_blocks)
    autoquant.apply_recipe(pipe, autoquant.Recipe.from_dict({
        "format": "autoquant-recipe/1", "components": ["transformer"], "layers": {
            r"re:transformer\.transformer_blocks\.0\..*": {"method": "torchao",
                                                              "type": "int8"}}}),
        progress=False)
    eager = generate(pipe)
    torch._dynamo.reset()
    counters.clear()
    assert autoquant.compile_pipeline(pipe) == ["transformer"]
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert pipe.transformer._compiled_call_impl is None  # the embedders and head stay eager
    compiled = generate(pipe)
    # double block 0 (int8), double block 1 (bf16), and the single blocks twice: the first
    # receives the concatenated text + image tokens with other strides than the next
    assert counters["stats"]["unique_graphs"] == 4
    assert (compiled.float() - eager.float()).abs().max() < 0.05


def test_a_compile_mode_with_cuda_graphs_copies_each_blocks_outputs(tiny_flux_factory):
    """reduce-overhead / max-autotune record CUDA graphs: block by block, the next block of a
    kind would overwrite its graph's output, so each call's outputs are copied out (here on
    the CPU, where no graph is recorded, the copying wrapper and the images are checked)."""
    from autoquant.runtime.compile import compile_module, regions, uncompile
    from tests.helpers import generate

    pipe = tiny_flux_factory()
    eager = generate(pipe)
    with pytest.raises(InputError, match="compile mode 'fastest'"):
        autoquant.compile_pipeline(pipe, mode="fastest")
    torch._dynamo.reset()
    done = compile_module(pipe.transformer, mode="reduce-overhead")
    try:
        block = regions(pipe.transformer)[0]
        assert block._compiled_call_impl.__name__ == "call"  # the copying wrapper
        assert (generate(pipe).float() - eager.float()).abs().max() < 0.05
    finally:
        uncompile(done)
        torch._dynamo.reset()


def test_compile_mode_needs_compile(tmp_path, capsys):
    from autoquant.cli.commands import main

    (tmp_path / "r.yaml").write_text("format: autoquant-recipe/1\n"
                                     "default: {method: torchao, type: int8}\n")
    assert main(["apply", "--model", "tiny-flux", "--recipe", str(tmp_path / "r.yaml"),
                 "--compile-mode", "reduce-overhead"]) == 2
    assert "--compile-mode applies with --compile" in capsys.readouterr().err


def test_compiled_undoes_itself():
    from autoquant.runtime.latency import compiled

    layer = torch.nn.Linear(4, 4)
    with compiled(layer) as fn:
        assert fn is layer and layer._compiled_call_impl is not None
    assert layer._compiled_call_impl is None


@pytest.mark.slow
def test_compile_pipeline_runs_the_denoiser_compiled(tiny_sd_factory):
    from tests.helpers import generate

    pipe = tiny_sd_factory()
    autoquant.apply_recipe(pipe, autoquant.Recipe.from_dict({
        "format": "autoquant-recipe/1", "components": ["unet"],
        "default": {"method": "torchao", "type": "int8"}}), progress=False)
    eager = generate(pipe)
    assert autoquant.compile_pipeline(pipe) == ["unet"]
    compiled = generate(pipe)
    assert (compiled.float() - eager.float()).abs().max() < 0.05


def test_the_explorer_draws_step_time_when_it_was_searched(tmp_path):
    from autoquant import explore
    from autoquant.cli.commands import main

    assert main(["search", "--model", "tiny-flux", "--dtype", "auto", "--budget", "60%",
                 "--trials", "3", "--seeds", "0", "--no-clip", "--space", "hqq-only",
                 "--sensitivity", "anchored", "--latency", "3x", "--out", str(tmp_path),
                 "--json"]) == 0
    view = explore.open_study(tmp_path)
    titles = [a.text for a in explore.front_figure(view).layout.annotations]
    assert "PSNR (dB) vs step time" in titles
    assert all("latency" in t.metrics for t in view.complete)
