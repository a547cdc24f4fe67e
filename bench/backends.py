"""Every registered method at every bit width on one Flux-size layer: relative output error,
bytes (formula, checked against measured) vs fp16, and matmul time vs bf16.

    python bench/backends.py [--device cuda] [--out 3072 --in 12288 --tokens 4096] [--json F]

Default shape: Flux's single-block MLP projection, 3072 x 12288 (out x in) at 4096 tokens
(a 1024 px image). Times are the median of CUDA-event timings after warm-up (CPU: perf_counter).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from autoquant.backends.measure import measured_bytes
from autoquant._format import human_bytes, table
from autoquant.backends import get_backend, methods

from _common import write_json


def timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after 3 warm-ups."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out-features", type=int, default=3072)
    ap.add_argument("--in-features", type=int, default=12288)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--hqq-backends", default="PYTORCH,PYTORCH_COMPILE",
                    help="HQQLinear forward backends to time (class-wide setting in hqq)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16
    o, i = args.out_features, args.in_features
    torch.manual_seed(0)
    lin = nn.Linear(i, o, bias=True, device=device, dtype=dtype).requires_grad_(False)
    # Trained weights are roughly Gaussian; std as in a 3072-wide transformer.
    nn.init.normal_(lin.weight, std=0.02)
    x = torch.randn(args.tokens, i, device=device, dtype=dtype)
    with torch.no_grad():
        ref = lin(x)
        t_bf16 = timed(lambda: lin(x), device, args.repeats)
    fp16_bytes = (o * i + o) * 2
    rows, records = [], []
    for method in methods():
        backend = get_backend(method)
        for cfg in backend.configs():
            reason = backend.unavailable_reason(cfg, device) or backend.layer_reason(cfg, o, i, dtype)
            variants = [None]
            if method == "hqq" and device.type == "cuda":
                variants = args.hqq_backends.split(",")
            for variant in variants:
                label = cfg.label + (f" [{variant}]" if variant else "")
                rec = {"method": method, "config": cfg.to_dict(), "label": label,
                       "bits": cfg.nominal_bits}
                if reason:
                    rec["error"] = reason
                    records.append(rec)
                    rows.append([label, f"{cfg.nominal_bits:g}", "-", "-", "-", "-", reason[:60]])
                    continue
                try:
                    if variant:
                        from hqq.core.quantize import HQQBackend, HQQLinear
                        HQQLinear.set_backend(getattr(HQQBackend, variant))
                    t0 = time.perf_counter()
                    q = backend.quantize(lin, cfg, device)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t_quant = time.perf_counter() - t0
                    with torch.no_grad():
                        y = q(x)
                        err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                        t = timed(lambda: q(x), device, args.repeats)
                    predicted = backend.nbytes(cfg, o, i, True, dtype, device)
                    measured = measured_bytes(q)
                    rec.update(rel_error=err, bytes=predicted, measured_bytes=measured,
                               bytes_vs_fp16=predicted / fp16_bytes, matmul_s=t,
                               matmul_vs_bf16=t / t_bf16, quantize_s=t_quant)
                    rows.append([label, f"{cfg.nominal_bits:g}", f"{err:.4f}",
                                 f"{predicted / fp16_bytes:.3f}",
                                 "yes" if predicted == measured else f"NO ({measured})",
                                 f"{t * 1e3:.3f}", f"{t / t_bf16:.2f}x"])
                    q = None  # free the layer before the next one
                except Exception as e:  # report, keep going
                    rec["error"] = f"{type(e).__name__}: {e}"[:300]
                    rows.append([label, f"{cfg.nominal_bits:g}", "-", "-", "-", "-",
                                 rec["error"][:60]])
                records.append(rec)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}),"
          f" torch {torch.__version__}; layer {o}x{i} bf16 + bias, {args.tokens} tokens; "
          f"bf16 matmul {t_bf16 * 1e3:.3f} ms; fp16 bytes {human_bytes(fp16_bytes)}")
    print(table(rows, ["config", "bits", "rel err", "bytes/fp16", "formula=measured",
                       "matmul ms", "vs bf16"]))
    if args.json:
        write_json(args.json, {
            "device": str(device), "shape": [o, i], "tokens": args.tokens,
            "torch": torch.__version__, "bf16_matmul_s": t_bf16, "fp16_bytes": fp16_bytes,
            "rows": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
