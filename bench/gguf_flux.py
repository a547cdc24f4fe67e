"""GGUF on the Flux demo (held-out prompts and seeds): at the bytes of each uniform file people
download (Q8_0 ... Q2_K, each with the usual keep list in the model's dtype), autoquant's
searched GGUF plan (``--space gguf``) and the positional planner of ComfyUI-GGUF's newest
converter, re-implemented from its description; the importance matrix on and off at equal bytes;
and the searched plan exported, loaded back by diffusers and re-scored.

The positional planner (``--max-size-mb``, as described in the issue): every core 2-D tensor
starts at 8 bits -- here Q8_0; its own default is the ComfyUI-only ``Q8_CR``, an int8 with a
rotation, which no other loader reads -- then tensors are downgraded from the middle of the
checkpoint order outwards, first to Q5_0, then to Q4_0 (then 1-D tensors to BF16, which cannot
matter here: they are a few KiB), until the file fits; the first and last blocks stay higher.

The search measures its sensitivity table in ``images`` mode (a generation per entry: the
replayed table, blind to guidance, planned below uniform here) and chooses every tensor, the
usual keep list included; ``--space`` / ``--sensitivity`` reproduce the other runs.

    python bench/gguf_flux.py [--trials 30] [--json bench/results/gguf_flux.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import autoquant
from autoquant._format import human_bytes, table
from autoquant.export.gguf import export_gguf, load_gguf
from autoquant.export.names import flux_layout
from autoquant.scoring.evaluator import evaluate_replaced
from autoquant.search import Search, SearchConfig, run_search

from _common import environment, write_json
from _demo import search_settings

MODEL = "demo-flux"
UNIFORM = ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "Q3_K", "Q2_K")
KEEP = {"re:transformer\\.(x_embedder|context_embedder|proj_out)": {"method": "none"},
        "re:transformer\\.(time_text_embed|norm_out)\\..*": {"method": "none"}}


def uniform(type_name: str, imatrix: bool = False) -> autoquant.Recipe:
    return autoquant.Recipe.from_dict({
        "format": "autoquant-recipe/1", "components": ["transformer"], "model": {"id": MODEL},
        "default": {"method": "gguf", "type": type_name, "imatrix": imatrix}, "layers": KEEP})


def without_imatrix(recipe: autoquant.Recipe) -> autoquant.Recipe | None:
    """``recipe`` with every imatrix layer rounded without one (None: it uses none)."""
    d = recipe.to_dict()
    found = False
    for spec in [d.get("default", {}), *d.get("layers", {}).values()]:
        if spec.get("imatrix"):
            spec["imatrix"], found = False, True
    return autoquant.Recipe.from_dict(d) if found else None


def type_counts(recipe: autoquant.Recipe, pipe) -> dict[str, int]:
    """How many of the transformer's Linear layers the plan puts at each config."""
    plan = recipe.resolve(autoquant.inventory(pipe))
    out: dict[str, int] = {}
    for name, cfg in plan.configs.items():
        if name.startswith("transformer."):
            out[cfg.label] = out.get(cfg.label, 0) + 1
    return dict(sorted(out.items()))


def positional(pipe, target_bytes: int) -> autoquant.Recipe | None:
    """The converter's planner: Q8_0 everywhere, middle-out downgrades to Q5_0, then Q4_0."""
    inv = autoquant.inventory(pipe)
    keep = uniform("Q8_0").resolve(inv)
    core = [l for l in inv if l.component == "transformer"
            and not keep.configs[l.name].full_precision]
    # checkpoint order: BFL's tensors, each the layers it stacks
    by_path = {l.path: l.name for l in core}
    order = [[by_path[p[:-len(".weight")]] for p in parts]
             for _, parts, _ in flux_layout(list(pipe.transformer.state_dict()))
             if parts[0].endswith(".weight") and parts[0][:-len(".weight")] in by_path]
    mid = (len(order) - 1) / 2
    middle_out = sorted(range(len(order)), key=lambda i: (abs(i - mid), i))
    types = {i: "Q8_0" for i in range(len(order))}

    def recipe():
        layers = dict(KEEP)
        for i, names in enumerate(order):
            for n in names:
                layers[n] = {"method": "gguf", "type": types[i]}
        return autoquant.Recipe.from_dict({"format": "autoquant-recipe/1",
                                           "components": ["transformer"], "model": {"id": MODEL},
                                           "default": {"method": "none"}, "layers": layers})

    for step in ("Q5_0", "Q4_0"):
        for i in middle_out:
            if recipe().resolve(inv).nbytes(["transformer"]) <= target_bytes:
                return recipe()
            types[i] = step
    r = recipe()
    return r if r.resolve(inv).nbytes(["transformer"]) <= target_bytes else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=30, help="search trials per budget")
    ap.add_argument("--space", default="gguf")
    ap.add_argument("--sensitivity", default="images")
    ap.add_argument("--json", default="bench/results/gguf_flux.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    pipe = autoquant.load_pipeline(MODEL)
    clip = autoquant.load_clip("demo")
    holdout = autoquant.Evaluator(pipe, autoquant.EvalSettings.for_model(MODEL, "holdout"),
                                  clip=clip, progress=False)
    t0 = time.perf_counter()
    base = {t: holdout.evaluate(uniform(t), t) for t in UNIFORM}
    imat = {t: holdout.evaluate(uniform(t, True), t + "+imatrix") for t in ("Q4_K", "Q3_K", "Q2_K")}
    print(f"uniform files scored ({time.perf_counter() - t0:.0f} s)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="gguf-flux-"))
    search = Search(SearchConfig(model=MODEL, budget=str(base["Q4_K"].bytes),
                                 space=autoquant.load_space(args.space), trials=args.trials,
                                 out=tmp / "s", settings=search_settings(model=MODEL), clip=clip,
                                 progress=False, sensitivity=args.sensitivity), pipe)
    t1 = time.perf_counter()
    search.prepare()
    prepare_s = time.perf_counter() - t1
    print(f"sensitivity ({args.sensitivity}) measured in {prepare_s:.0f} s", flush=True)
    rows, records = [], []
    for t in UNIFORM:
        r = base[t]
        rec = {"type": t, "bytes": r.bytes, "bits_per_weight": r.bits_per_weight,
               "uniform": {k: r.metrics[k]["mean"] for k in ("psnr", "ssim", "clip_fidelity")}}
        if t not in ("Q8_0", "Q6_K"):  # the 5-bit sizes and below (the types' own bits)
            search.retarget(str(r.bytes), tmp / t)
            report = run_search(search)
            ours = holdout.evaluate(autoquant.load_recipe(tmp / t / "best.yaml"), "autoquant")
            best = autoquant.load_recipe(tmp / t / "best.yaml")
            rec["autoquant"] = {"bytes": ours.bytes, "trials": report["trials"],
                                "types": type_counts(best, pipe),
                                **{k: ours.metrics[k]["mean"] for k in ("psnr", "ssim",
                                                                        "clip_fidelity")}}
            off = without_imatrix(best)
            if off is not None:  # the same plan, the same bytes, plain ggml rounding
                o = holdout.evaluate(off, "autoquant, imatrix off")
                rec["autoquant_imatrix_off"] = {"bytes": o.bytes,
                                                "psnr": o.metrics["psnr"]["mean"]}
            pos = positional(pipe, r.bytes)
            if pos is not None:
                p = holdout.evaluate(pos, "positional")
                rec["positional"] = {"bytes": p.bytes, **{k: p.metrics[k]["mean"] for k in
                                                          ("psnr", "ssim", "clip_fidelity")}}
            rec["gain_db"] = ours.metrics["psnr"]["mean"] - r.metrics["psnr"]["mean"]
        records.append(rec)
        a, pz = rec.get("autoquant"), rec.get("positional")
        rows.append([t, human_bytes(r.bytes), f"{r.bits_per_weight:.2f}",
                     f"{rec['uniform']['psnr']:.2f}", f"{a['psnr']:.2f}" if a else "-",
                     f"{rec['gain_db']:+.2f}" if a else "-", f"{pz['psnr']:.2f}" if pz else "-",
                     f"{rec['uniform']['clip_fidelity']:.4f}",
                     f"{a['clip_fidelity']:.4f}" if a else "-"])
        print(rows[-1], flush=True)
    print(table(rows, ["uniform file", "bytes", "bits/w", "uniform PSNR", "autoquant PSNR",
                       "gain", "positional PSNR", "uniform CLIP fid", "autoquant CLIP fid"]))
    imatrix_rows = {t: {"off": base[t].metrics["psnr"]["mean"],
                        "on": imat[t].metrics["psnr"]["mean"]} for t in imat}
    print("imatrix at equal bytes (held-out PSNR off -> on): " + ", ".join(
        f"{t} {v['off']:.2f} -> {v['on']:.2f}" for t, v in imatrix_rows.items()))
    for r in records:
        if "autoquant_imatrix_off" in r:
            print(f"searched plan at {r['type']} bytes, imatrix on -> off: "
                  f"{r['autoquant']['psnr']:.2f} -> {r['autoquant_imatrix_off']['psnr']:.2f} dB")
    # the Q4_K-size plan as a file, loaded by diffusers, scored again
    best = autoquant.load_recipe(tmp / "Q4_K" / "best.yaml")
    info = export_gguf(pipe, best, tmp / "best.gguf", names="diffusers", progress=False)
    scored = holdout.evaluate(best, "recipe")
    scored_images = holdout.last_images.clone()
    loaded = load_gguf(tmp / "best.gguf", pipe)
    from_file = evaluate_replaced(holdout, "transformer", loaded, "file")
    mse = (holdout.last_images - scored_images).pow(2).mean().item()
    agree = {"identical": mse == 0.0, "psnr_between": float("inf") if mse == 0 else
             10 * torch.log10(torch.tensor(1 / mse)).item(),
             "recipe_psnr": scored.metrics["psnr"]["mean"],
             "file_psnr": from_file.metrics["psnr"]["mean"], "file_bytes": info["bytes"]}
    print(f"best Q4_K-size plan as a GGUF file ({human_bytes(info['bytes'])}): scored "
          f"{agree['recipe_psnr']:.2f} dB, the file through diffusers {agree['file_psnr']:.2f} dB"
          f", images identical: {agree['identical']}")
    bfl = export_gguf(pipe, best, tmp / "best-bfl.gguf", names="bfl", progress=False)
    write_json(args.json, {"environment": environment(), "space": args.space,
                           "sensitivity": args.sensitivity, "sensitivity_s": prepare_s,
                           "trials": args.trials, "rows": records,
                           "imatrix": imatrix_rows, "file": agree,
                           "bfl_file": {k: bfl[k] for k in ("bytes", "tensors", "types")}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
