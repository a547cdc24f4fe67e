"""GGUF at Flux-dev size (Flux-dev's architecture, random weights: no weights can be downloaded):
export a mixed-type plan of the 12B transformer, the file's size against the prediction, the
export's time and peak host memory above the model itself, diffusers' load time, and one
denoiser step (1024 px) of the loaded file against bf16 and against the same plan in
autoquant's own layers -- whose output the file's must match.

    python bench/gguf_flux_dev.py [--small] [--json bench/results/gguf_flux_dev_h100.json]

``--small``: a narrow two-block variant, to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import autoquant
from autoquant._format import human_bytes, table
from autoquant.export.gguf import export_gguf, from_single_file, load_gguf, plan_file
from autoquant.generation.settings import EvalSettings, prompt_set
from autoquant.scoring.evaluator import generate_images
from autoquant.search._replay import Replay
from autoquant.backends.measure import measured_bytes

from _common import environment, write_json
from _flux import build_pipeline, time_call

KEEP = {"re:transformer\\.(x_embedder|context_embedder|proj_out)": {"method": "none"},
        "re:transformer\\.(time_text_embed|norm_out)\\..*": {"method": "none"}}


def plan(last_double: int) -> autoquant.Recipe:
    """A mixed plan of the kind a search returns: Q4_K, the first and last double blocks Q6_K,
    the single blocks' output projections Q5_K, attention's fused qkv Q5_K, the keep list in
    bf16. (Every tensor BFL fuses gets one type, so it exports with BFL names.)"""
    ends = f"(0|{last_double})"
    layers = {
        f"re:transformer\\.transformer_blocks\\.{ends}\\..*": {"method": "gguf", "type": "Q6_K"},
        "re:transformer\\.single_transformer_blocks\\.\\d+\\.proj_out": {"method": "gguf",
                                                                         "type": "Q5_K"},
        **KEEP}
    middle = "|".join(str(i) for i in range(1, last_double))
    if middle:
        layers[f"re:transformer\\.transformer_blocks\\.({middle})\\.attn\\."
               f"(to_[qkv]|add_[qkv]_proj)"] = {"method": "gguf", "type": "Q5_K"}
    return autoquant.Recipe.from_dict({
        "format": "autoquant-recipe/1", "components": ["transformer"],
        "model": {"id": "flux-dev-architecture-random"},
        "default": {"method": "gguf", "type": "Q4_K"}, "layers": layers})


class PeakRSS:
    """The process's peak resident memory while inside, sampled every 20 ms (Linux)."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def step_call(pipe, size: int) -> tuple:
    """One real denoiser call at ``size`` px (batch 1, 512 text tokens, Flux-dev's guidance),
    captured from a short generation, as the other Flux benches take it."""
    settings = EvalSettings(prompts=prompt_set("flux", "search")[:1], seeds=(0,), steps=2,
                            guidance=3.5, height=size, width=size, batch_size=1,
                            extra=(("max_sequence_length", 512),))
    return Replay.capture(pipe, "transformer", lambda: generate_images(
        pipe, settings, settings.pairs())).step_call()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default="bench/results/gguf_flux_dev.json")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = 256 if args.small else args.size
    t0 = time.perf_counter()
    pipe = build_pipeline(torch.device("cpu"), args.small)
    transformer = pipe.transformer
    params = sum(p.numel() for p in transformer.parameters())
    print(f"transformer: {params / 1e9:.2f}B parameters, built in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    recipe = plan(transformer.config.num_layers - 1)
    inv = autoquant.inventory(pipe)
    predicted = recipe.resolve(inv).nbytes(["transformer"])
    entries, _ = plan_file(pipe, recipe)
    out: dict = {"environment": environment(device), "parameters": params,
                 "bf16_bytes": measured_bytes(transformer), "predicted_bytes": predicted,
                 "tensor_bytes_planned": sum(e.nbytes for e in entries)}
    tmp = Path(tempfile.mkdtemp(prefix="gguf-flux-dev-"))
    path = tmp / "flux-dev-plan.gguf"
    with PeakRSS() as rss:
        t = time.perf_counter()
        info = export_gguf(pipe, recipe, path, progress=False)
        out["export_s"] = time.perf_counter() - t
    out.update(file_bytes=info["bytes"], types=info["types"], tensors=info["tensors"],
               export_peak_rss_above_model=rss.peak - rss.start,
               export_threads=torch.get_num_threads())
    out["file_vs_predicted"] = info["bytes"] / predicted - 1
    out["file_vs_planned_tensors"] = info["bytes"] / out["tensor_bytes_planned"] - 1
    print(f"exported {info['tensors']} tensors {info['types']} in {out['export_s']:.0f} s: "
          f"{human_bytes(info['bytes'])} (predicted {human_bytes(predicted)}, "
          f"{out['file_vs_predicted']:+.3%}; its tensors as planned + the header: "
          f"{out['file_vs_planned_tensors']:+.4%}); peak memory above the model "
          f"{human_bytes(out['export_peak_rss_above_model'])}", flush=True)
    t = time.perf_counter()
    # the BFL file itself at Flux-dev's widths (diffusers' key converter assumes them); --small
    # loads a diffusers-named twin through autoquant's checked loader
    loaded = from_single_file(path, transformer) if not args.small else load_gguf(
        export_gguf(pipe, recipe, tmp / "diffusers.gguf", names="diffusers",
                    progress=False)["path"], pipe)
    out["diffusers_load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    loaded.to(device)
    out["to_device_s"] = time.perf_counter() - t
    print(f"diffusers from_single_file: {out['diffusers_load_s']:.1f} s (+ "
          f"{out['to_device_s']:.1f} s to {device})", flush=True)
    with torch.no_grad():
        pipe.to(device)
        args_, kwargs = step_call(pipe, size)
        run = lambda m: m(*args_, **kwargs)  # noqa: E731
        out["bf16_step_s"] = time_call(lambda: run(transformer), device, args.repeats, 2)
        transformer.to("cpu")
        out["file_step_s"] = time_call(lambda: run(loaded), device, args.repeats, 2)
        from_file = run(loaded)[0].float()
        loaded.to("cpu")
        del loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
        t = time.perf_counter()
        autoquant.apply_recipe(pipe, recipe, device=device, progress=False)
        out["autoquant_apply_s"] = time.perf_counter() - t
        out["autoquant_step_s"] = time_call(lambda: run(pipe.transformer), device,
                                            args.repeats, 2)
        ours = run(pipe.transformer)[0].float()
    rows = []
    diff = (from_file - ours).pow(2).mean() / ours.pow(2).mean()
    out["file_vs_autoquant_rel_mse"] = diff.item()
    out["file_vs_autoquant_identical"] = bool(torch.equal(from_file, ours))
    for name, what in (("bf16", "bf16 (diffusers)"),
                       ("file", "GGUF file via diffusers (GGUFLinear)"),
                       ("autoquant", "same plan, autoquant's gguf layers")):
        s = out[f"{name}_step_s"]
        rows.append([what, f"{s * 1e3:.1f}", f"{s / out['bf16_step_s']:.2f}x"])
    print(table(rows, [f"one step, {size} px, {device}", "ms", "vs bf16"]))
    print(f"file vs autoquant's layers: relative MSE {diff.item():.2e}, identical: "
          f"{out['file_vs_autoquant_identical']}")
    path.unlink()
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
