"""Searching inside a GPU memory cap: the placement decision, layer streaming, prompt embeddings
kept once, the layer cache's device copies, and the refusals (CPU; the GPU run is marked)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoquant
from autoquant import AutoquantError
from autoquant.generation.embeddings import PromptEmbeddings
from autoquant.runtime.streaming import LayerStreamer, device_copy
from autoquant.cli.commands import main
from autoquant.runtime.memory import GiB, ComponentSize, decide, parse_memory

from .helpers import generate


def test_parse_memory():
    assert parse_memory("24GiB") == 24 * GiB
    assert parse_memory("16GB") == 16 * 10**9
    assert parse_memory("512MiB") == 512 * 2**20
    for bad in ("30%", "4bpw", "lots", "-1GB"):
        with pytest.raises(AutoquantError):
            parse_memory(bad)


FLUX = {"transformer": ComponentSize(int(22.2 * GiB), int(22.1 * GiB), 94 * 2**20),
        "vae": ComponentSize(160 * 2**20, 2 * 2**20, 2**19),
        "text_encoder": ComponentSize(int(0.23 * GiB), int(0.16 * GiB), 9 * 2**20),
        "text_encoder_2": ComponentSize(int(8.9 * GiB), int(8.6 * GiB), 80 * 2**20)}
ENCODERS = ["text_encoder", "text_encoder_2"]


def test_what_streams_follows_the_cap():
    plan, act = int(6.7 * GiB), 3 * GiB
    place, need = decide(FLUX, ENCODERS, 80 * GiB, plan, act)
    assert place == {"transformer": "resident", "vae": "resident", "text_encoder": "encode",
                     "text_encoder_2": "encode"}
    assert need < 80 * GiB
    place, need = decide(FLUX, ENCODERS, 24 * GiB, plan, act)
    assert place["transformer"] == "streamed" and place["vae"] == "resident"
    # resident: the non-Linear tensors; the window: 4 of the largest layers (T5's or Flux's)
    assert need < 24 * GiB
    assert need >= plan + act + FLUX["vae"].total + 4 * 94 * 2**20
    place, need = decide(FLUX, ENCODERS, 4 * GiB, plan, act)
    assert need > 4 * GiB  # nothing left to stream: the caller refuses with ``need``


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(),
                         nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 4)).eval()


def test_streamed_layers_compute_the_same_and_go_home_after():
    model, x = _mlp(), torch.randn(5, 8)
    want = model(x)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    streamer = LayerStreamer(torch.device("cpu"), depth=1)
    streamer.attach(linears)
    homes = [m.weight.data_ptr() for m in linears]
    for _ in range(3):  # the first call learns the order, the next ones prefetch
        assert torch.equal(model(x), want)
        # after a forward only the next call's first layer may be waiting (prefetched)
        assert set(streamer.loaded) <= {linears[0]}
        assert all(m.weight.data_ptr() == h for m, h in zip(linears, homes))
    assert streamer.next == {linears[i]: linears[i + 1] for i in range(3)} | {
        linears[3]: linears[0]}
    assert streamer.peak_window_bytes <= streamer.planned_window_bytes
    sizes = sum(m.weight.numel() * 4 + m.bias.numel() * 4 for m in linears)
    first = linears[0].weight.numel() * 4 + linears[0].bias.numel() * 4
    # each layer once per forward (the guesses all came true), plus the 4th call's first layer
    assert streamer.bytes_copied == 3 * sizes + first
    # a layer swapped out (as the layer cache does) is never called: a wrong guess is dropped
    model[2] = device_copy(linears[1], torch.device("cpu"))
    assert torch.equal(model(x), want) and linears[1] not in streamer.loaded
    streamer.detach()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in linears)


def test_device_copy_is_an_independent_copy_without_hooks():
    layer = nn.Linear(4, 3)
    calls = []
    layer.register_forward_pre_hook(lambda m, a: calls.append(1))
    copy = device_copy(layer, torch.device("cpu"))
    x = torch.randn(2, 4)
    assert torch.equal(copy(x), layer(x)) and calls == [1]
    assert copy.weight.data_ptr() != layer.weight.data_ptr() and type(copy) is nn.Linear
    with pytest.raises(ValueError):
        device_copy(nn.Sequential(layer), torch.device("cpu"))


def test_prompt_embeddings_are_computed_once_per_batch_and_change_no_image(tiny_flux_factory):
    pipe = tiny_flux_factory()
    want = [generate(pipe, prompt=p) for p in ("a red cat", "a blue dog")]
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    runs = []
    for e in encoders:
        e.register_forward_pre_hook(lambda m, a: runs.append(m))
    memo = PromptEmbeddings.install(pipe, ["text_encoder", "text_encoder_2"])
    assert PromptEmbeddings.install(pipe, ["text_encoder"]) is memo  # once per pipeline
    for _ in range(2):
        got = [generate(pipe, prompt=p) for p in ("a red cat", "a blue dog")]
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert (memo.misses, memo.hits) == (2, 2) and len(runs) == 2 * len(encoders)
    embeds = pipe.encode_prompt("a red cat", prompt_2=None)[0]
    embeds.mul_(0)  # the caller's copy: the cache is untouched
    assert torch.equal(generate(pipe, prompt="a red cat"), want[0])
    memo.uninstall()
    assert "encode_prompt" not in pipe.__dict__


def test_the_layer_cache_holds_device_copies_of_streamed_full_precision_layers(tmp_path):
    from autoquant.backends import full_precision
    from autoquant.search._cache import LayerCache
    from autoquant.models.inventory import inventory

    pipe = autoquant.load_pipeline("tiny-flux", dtype="auto")
    inv = inventory(pipe)
    streamed = [l.name for l in inv if l.component == "transformer"]
    cache = LayerCache(pipe, inv, torch.device("cpu"), streamed=streamed)
    name = streamed[0]
    original = pipe.transformer.get_submodule(inv[name].path)
    cache.assemble({name: full_precision()})
    installed = pipe.transformer.get_submodule(inv[name].path)
    assert installed is not original and cache.nbytes == inv[name].bytes
    assert torch.equal(installed.weight, original.weight)
    other = streamed[1]  # not in the plan: its original (streamed), not a copy
    assert pipe.transformer.get_submodule(inv[other].path) is cache.originals[other]
    cache.restore()
    assert pipe.transformer.get_submodule(inv[name].path) is original


def test_gpu_memory_is_refused_clearly_off_a_gpu(tmp_path, capsys):
    from autoquant.runtime.memory import MemoryPlan
    from autoquant.search import Search, SearchConfig
    from autoquant.search.space import load_space

    pipe = autoquant.load_pipeline("tiny-flux", dtype="auto")
    with pytest.raises(AutoquantError, match="CUDA"):
        MemoryPlan(pipe, torch.device("cpu"), GiB, ["transformer"], 10**6)
    with pytest.raises(AutoquantError, match="--gpu-memory bounds a CUDA device"):
        Search(SearchConfig(model="tiny-flux", budget="40%", space=load_space("default"),
                            out=tmp_path, gpu_memory="1GiB", progress=False), pipe)
    with pytest.raises(AutoquantError, match="give bytes with a unit"):
        SearchConfig(model="tiny-flux", budget="40%", space=load_space("default"),
                     gpu_memory="50%")
    for argv, said in ((["--gpu-memory", "24GiB"], "give --device cuda"),
                       (["--gpu-memory", "lots", "--device", "cuda"], "use bytes")):
        assert main(["search", "--model", "tiny-flux", "--budget", "40%", "--out",
                     str(tmp_path / "s"), *argv]) == 2
        assert said in capsys.readouterr().err
    assert main(["evaluate", "--model", "tiny-flux", "--gpu-memory", "8GiB"]) == 2
    assert "give --device cuda" in capsys.readouterr().err


# -- on a GPU (the device tool) ------------------------------------------------------------------
@pytest.mark.gpu
def test_streaming_on_a_gpu_matches_resident_and_holds_a_window():
    model, x = _mlp().cuda(), torch.randn(5, 8, device="cuda")
    want = model(x)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    streamer = LayerStreamer(torch.device("cuda"), depth=2)
    streamer.attach(linears)
    assert all(m.weight.device.type == "cpu" and m.weight.is_pinned() for m in linears)
    for _ in range(3):
        assert torch.equal(model(x), want)
    assert streamer.peak_window_bytes <= streamer.planned_window_bytes
    assert set(streamer.loaded) <= set(linears[:2])  # the next call's first layers, prefetched
    streamer.release()
    assert not streamer.loaded and streamer.window_bytes == 0


@pytest.mark.gpu
def test_a_search_with_the_denoiser_streamed_proposes_what_the_resident_one_does(tmp_path):
    """The same study twice on tiny-flux, the transformer resident then streamed: the same
    sensitivity table (to float rounding), the same seed plans, the same best plan's PSNR."""
    from autoquant.search import Search, SearchConfig, run_search
    from autoquant.generation.settings import EvalSettings
    from autoquant.search.space import SearchSpace

    from .test_search import SPACE

    results = []
    for i, placement in enumerate(("resident", "streamed")):
        pipe = autoquant.load_pipeline("tiny-flux", dtype="auto")
        settings = EvalSettings.for_model("tiny-flux", "search", seeds=[0], batch_size=8)
        cfg = SearchConfig(model="tiny-flux", budget="40%", space=SearchSpace.from_dict(SPACE),
                           trials=4, out=tmp_path / str(i), settings=settings, clip=None,
                           progress=False, sensitivity="anchored", device="cuda",
                           gpu_memory="4GiB")
        search = Search(cfg, pipe)
        if placement == "streamed":  # too small to need it: forced, to exercise the path
            search.memory.placement["transformer"] = "streamed"
            search.memory._put("transformer", "streamed")
            search.cache.streamed = search.memory.streamed_layers()
        report = run_search(search)
        assert report["memory"]["placement"]["transformer"] == placement
        assert report["memory"]["peak_allocated_bytes"] <= 4 * GiB
        results.append((search.error, search.seeds(), report["best"]["psnr"]))
    (t0, s0, p0), (t1, s1, p1) = results
    assert s0 == s1
    assert all(abs(a - b) <= 1e-3 * max(abs(a), 1e-9) for r0, r1 in zip(t0, t1)
               for a, b in zip(r0, r1))
    assert abs(p0 - p1) < 0.05


def test_out_of_memory_in_the_sensitivity_pass_gives_cache_memory_back_and_retries():
    from autoquant.backends import config_from_dict
    from autoquant.search._cache import LayerCache
    from autoquant.search._sensitivity import _retrying
    from autoquant.models.inventory import inventory

    pipe = autoquant.load_pipeline("tiny-flux", dtype="auto")
    inv = inventory(pipe)
    cache = LayerCache(pipe, inv, torch.device("cpu"), max_bytes=10**9)
    cfg = config_from_dict({"method": "hqq", "bits": 4, "group_size": 32})
    for layer in list(inv)[:6]:
        cache.module(layer.name, cfg)
    held = cache.nbytes
    attempts = []

    def work():
        attempts.append(1)
        if len(attempts) <= 2:  # the allocator's cache emptied first, then the layer cache's
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return 42

    assert _retrying(cache, work) == 42 and len(attempts) == 3
    assert cache.shrinks == 1 and cache.nbytes < held and cache.max_bytes <= 0.85 * held
    cache.clear()
    with pytest.raises(torch.cuda.OutOfMemoryError):  # nothing left to give: it goes on up
        _retrying(cache, lambda: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("x")))


def test_modules_the_layer_cache_drops_are_freed_even_in_reference_cycles():
    """torchao's (and bitsandbytes') quantized modules sit in reference cycles: dropped from the
    cache they would hold their memory until Python's cycle collector happened to run."""
    import gc
    import weakref

    from autoquant.backends import config_from_dict
    from autoquant.search._cache import LayerCache
    from autoquant.models.inventory import inventory

    pipe = autoquant.load_pipeline("tiny-flux", dtype="auto")
    inv = inventory(pipe)
    shape = max((l.out_features, l.in_features) for l in inv if l.component == "transformer")
    layers = [l for l in inv if (l.out_features, l.in_features) == shape][:3]
    assert len(layers) == 3
    cfg = config_from_dict({"method": "torchao", "type": "int8"})
    size = max(l.nbytes(cfg) for l in layers)
    cache = LayerCache(pipe, inv, torch.device("cpu"), max_bytes=size)  # room for one
    cache.collect_every = 1
    gc.disable()
    try:
        first = weakref.ref(cache.module(layers[0].name, cfg))
        for layer in layers[1:]:
            cache.module(layer.name, cfg)
        assert cache.evictions == len(layers) - 1
        assert first() is None and cache.unfreed == 0
    finally:
        gc.enable()


@pytest.mark.gpu
def test_evaluate_with_the_denoiser_streamed_scores_like_the_resident_one(tmp_path):
    """``evaluate --gpu-memory``: references made with the transformer streaming, the recipe
    applied onto the GPU, the same scores as with everything resident; afterwards the
    transformer streams again."""
    from autoquant.scoring.evaluator import Evaluator
    from autoquant.runtime.memory import MemoryPlan
    from autoquant.plans.recipe import Recipe
    from autoquant.scoring.references import ReferenceCache
    from autoquant.generation.settings import EvalSettings

    from .test_apply import MIXED

    settings = EvalSettings.for_model("tiny-flux", "holdout", seeds=[0], batch_size=4)
    scores = []
    for i, placement in enumerate(("resident", "streamed")):
        pipe = autoquant.load_pipeline("tiny-flux", dtype="auto")
        memory = MemoryPlan(pipe, torch.device("cuda"), 4 * GiB, ["transformer"], 10**7,
                            placement={"transformer": placement}).place()
        ev = Evaluator(pipe, settings, clip=None, progress=False, memory=memory,
                       cache=ReferenceCache(tmp_path / str(i)))
        result = ev.evaluate(Recipe.from_dict(MIXED))
        scores.append((ev.references, result.metrics["psnr"]["mean"]))
        linears = memory.linear_modules["transformer"]
        if placement == "streamed":
            assert all(m.weight.device.type == "cpu" and memory.streamer.streams(m)
                       for m in linears)
    (r0, p0), (r1, p1) = scores
    assert torch.equal(r0, r1) and abs(p0 - p1) < 1e-3


def test_evaluate_under_a_memory_plan_applies_onto_its_device_and_streams_again_after(tmp_path):
    """The plumbing of ``evaluate --gpu-memory`` on the CPU (a plan built by hand: the real one
    needs CUDA): the recipe is applied with streaming paused, scores like a plain evaluate, and
    every transformer Linear streams again after, hooked once."""
    from autoquant.models.inventory import components_of
    from autoquant.scoring.evaluator import Evaluator
    from autoquant.runtime.memory import MemoryPlan
    from autoquant.plans.recipe import Recipe
    from autoquant.scoring.references import ReferenceCache
    from autoquant.generation.settings import EvalSettings

    from .test_apply import MIXED

    settings = EvalSettings.for_model("tiny-flux", "holdout", seeds=[0], batch_size=4)
    plain = autoquant.load_pipeline("tiny-flux", dtype="auto")
    want = Evaluator(plain, settings, clip=None, progress=False,
                     cache=ReferenceCache(tmp_path / "plain")).evaluate(Recipe.from_dict(MIXED))
    pipe = autoquant.load_pipeline("tiny-flux", dtype="auto")
    memory = MemoryPlan.__new__(MemoryPlan)
    memory.pipe, memory.device, memory.comps = pipe, torch.device("cpu"), components_of(pipe)
    memory.placement = {"transformer": "streamed"}
    memory.linear_modules = {"transformer": [m for m in pipe.transformer.modules()
                                             if type(m) is nn.Linear]}
    memory.streamer = LayerStreamer(torch.device("cpu"))
    memory._put("transformer", "streamed")
    got = Evaluator(pipe, settings, clip=None, progress=False, memory=memory,
                    cache=ReferenceCache(tmp_path / "streamed")).evaluate(Recipe.from_dict(MIXED))
    assert got.metrics["psnr"]["mean"] == pytest.approx(want.metrics["psnr"]["mean"], abs=1e-4)
    assert got.bytes == want.bytes
    linears = memory.linear_modules["transformer"]
    assert all(memory.streamer.streams(m) and len(m._forward_pre_hooks) == 1 for m in linears)
    # the originals are back in place: the recipe's modules are gone from the tree
    assert {m for m in pipe.transformer.modules() if type(m) is nn.Linear} == set(linears)
