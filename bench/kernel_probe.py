"""Which kernels are fast at Flux-dev's shapes: one Linear at a time, 4,096 rows (1024 px image
tokens) and 1 row (a modulation layer's input), each layer compiled alone (``torch.compile``,
default mode) and eager; time per call and the output's error against bf16.

    python bench/kernel_probe.py [--json bench/results/kernel_probe_h100.json]

Layers: bf16; torchao fp8 dynamic per row / per tensor; autoquant's int8 weight-only (opaque op)
and int8 dynamic; ``torch._int_mm`` with per-row scales (W8A8 written out); ``torch.
_weight_int8pack_mm``; gemlite's A16W4 and A8W4 (fp8 activations x hqq's 4-bit codes) where
gemlite is installed. A GPU run; the ratios are what the latency issue needs.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment, write_json  # noqa: E402

from autoquant.backends.measure import measured_bytes  # noqa: E402

SHAPES = [(3072, 12288), (12288, 3072)]  # (in, out): an MLP's two layers
# --shapes flux: every distinct shape of Flux-dev's transformer that a 4-bit group of 128 takes
FLUX_SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072), (3072, 9216), (15360, 3072),
               (3072, 18432), (3072, 64), (4096, 3072), (256, 3072), (768, 3072)]


def _time(fn, x, iters=30):
    for _ in range(5):
        fn(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn(x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _torchao(linear, cfg):
    from torchao.quantization import quantize_

    layer = nn.Linear(linear.in_features, linear.out_features, bias=True, device="cuda",
                      dtype=torch.bfloat16)
    layer.load_state_dict(linear.state_dict())
    quantize_(layer, cfg)
    return layer


def makers():
    import torchao.quantization as tq

    from autoquant.backends import get_backend
    from autoquant.backends.torchao import TorchaoConfig

    ta = get_backend("torchao")
    on_gpu = lambda t: (lambda lin: ta.quantize(lin, TorchaoConfig(type=t),  # noqa: E731
                                                torch.device("cuda")))
    out = {
        "bf16": lambda lin: lin,
        # torchao's default kernel preference (AUTO: mslk's kernels where mslk is installed)
        "fp8_dyn_row": lambda lin: _torchao(lin, tq.Float8DynamicActivationFloat8WeightConfig(
            granularity=tq.PerRow(), set_inductor_config=False)),
        "fp8_dyn_tensor": lambda lin: _torchao(lin, tq.Float8DynamicActivationFloat8WeightConfig(
            granularity=tq.PerTensor(), set_inductor_config=False)),
        "fp8_dynamic (autoquant)": on_gpu("fp8_dynamic"),
        "int8_wo (autoquant)": on_gpu("int8"),
        "int8_dyn (autoquant)": on_gpu("int8_dynamic"),
        "int_mm w8a8 (written out)": _int_mm_layer,
        "_weight_int8pack_mm": _int8pack_layer,
        # int4 weights x fp8 activations (mslk's CUTLASS mixed-input GEMMs; needs mslk-cuda)
        "fp8_int4 preshuffled (torchao)": lambda lin: _torchao(
            lin, tq.Float8DynamicActivationInt4WeightConfig(int4_packing_format="preshuffled")),
        "fp8_int4 plain (torchao)": lambda lin: _torchao(
            lin, tq.Float8DynamicActivationInt4WeightConfig(int4_packing_format="plain")),
        "fp8_int4 (autoquant)": on_gpu("fp8_int4"),
        "fp8_int4_plain (autoquant)": on_gpu("fp8_int4_plain"),
        "bf16 x int4 preshuffled (mslk)": lambda lin: _torchao(lin, tq.Int4WeightOnlyConfig(
            group_size=128, int4_packing_format="preshuffled", set_inductor_config=False)),
    }
    try:
        import gemlite  # noqa: F401

        out["gemlite A16W4 (hqq4 g64)"] = lambda lin: _gemlite(lin, "A16W4_HQQ_INT")
        out["gemlite A8W4 fp8 (hqq4 g64)"] = lambda lin: _gemlite(lin, "A8W4_HQQ_INT_dynamic")
        out["gemlite A8W8 fp8"] = lambda lin: _gemlite_w8(lin)
    except ImportError as e:
        print("gemlite not importable:", e)
    return out


class _IntMM(nn.Module):
    def __init__(self, lin):
        super().__init__()
        w = lin.weight.float()
        self.scale = (w.abs().amax(1) / 127).clamp(min=1e-8)
        self.q = (w / self.scale[:, None]).round().clamp(-127, 127).to(torch.int8).t()
        self.bias = lin.bias

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        xs = (flat.abs().amax(1, keepdim=True).float() / 127).clamp(min=1e-8)
        xq = (flat / xs).round().clamp(-127, 127).to(torch.int8)
        if xq.shape[0] <= 16:
            xq = torch.cat([xq, xq.new_zeros(17 - xq.shape[0], xq.shape[1])])
        y = torch._int_mm(xq, self.q)[: flat.shape[0]]
        y = (y.float() * xs * self.scale).to(x.dtype) + self.bias
        return y.reshape(*x.shape[:-1], -1)


def _int_mm_layer(lin):
    return _IntMM(lin)


class _Pack(nn.Module):
    def __init__(self, lin):
        super().__init__()
        w = lin.weight.float()
        self.scale = (w.abs().amax(1) / 127).clamp(min=1e-8).to(torch.bfloat16)
        self.q = (w / self.scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.bias = lin.bias

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        y = torch._weight_int8pack_mm(flat, self.q, self.scale) + self.bias
        return y.reshape(*x.shape[:-1], -1)


def _int8pack_layer(lin):
    return _Pack(lin)


def _gemlite(lin, kind):
    import gemlite.helper as gh
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    shell = nn.Linear(lin.in_features, lin.out_features, device="meta")
    shell.weight = nn.Parameter(lin.weight.detach().clone(), requires_grad=False)
    shell.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    h = HQQLinear(shell, BaseQuantizeConfig(nbits=4, group_size=64, axis=1),
                  compute_dtype=torch.bfloat16, device="cuda")
    return getattr(gh, kind)(dtype=torch.bfloat16).from_hqqlinear(h)


def _gemlite_w8(lin):
    import gemlite.helper as gh

    return gh.A8W8_fp8_dynamic(dtype=torch.bfloat16).from_linear(lin)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench/results/kernel_probe_h100.json")
    ap.add_argument("--rows", default="4096,1")
    ap.add_argument("--shapes", default="mlp", choices=["mlp", "flux"])
    ap.add_argument("--kernels", default=None,
                    help="comma-separated kernel names (default: all); bf16 is always run")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows_list = [int(r) for r in args.rows.split(",")]
    results = []
    wanted = None if args.kernels is None else {"bf16", *args.kernels.split(",")}
    for k, n in (SHAPES if args.shapes == "mlp" else FLUX_SHAPES):
        lin = nn.Linear(k, n, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        with torch.no_grad():
            lin.weight.normal_(0, 0.02)
            lin.bias.zero_()
        for name, make in makers().items():
            if wanted is not None and name not in wanted:
                continue
            try:
                layer = make(lin)
            except Exception as e:  # noqa: BLE001 -- a kernel this machine lacks: recorded
                results.append({"shape": [k, n], "kernel": name,
                                "error": f"build: {type(e).__name__}: {str(e)[:200]}"})
                print(f"{k}x{n} {name}: build failed {type(e).__name__}: {str(e)[:160]}",
                      flush=True)
                continue
            for rows in rows_list:
                x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
                row = {"shape": [k, n], "rows": rows, "kernel": name,
                       "bytes": measured_bytes(layer) if isinstance(layer, nn.Module) else None}
                with torch.no_grad():
                    ref = lin(x).float()
                    for mode in ("eager", "compiled"):
                        try:
                            fn = layer if mode == "eager" else torch.compile(layer)
                            y = fn(x).float()
                            row[f"{mode}_ms"] = _time(fn, x)
                            row[f"{mode}_rel_err"] = ((y - ref).norm() / ref.norm()).item()
                        except Exception as e:  # noqa: BLE001
                            row[f"{mode}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                            if mode == "compiled":
                                traceback.print_exc(limit=2)
                flops = 2 * rows * k * n
                for mode in ("eager", "compiled"):
                    if f"{mode}_ms" in row:
                        row[f"{mode}_tflops"] = flops / row[f"{mode}_ms"] / 1e9
                results.append(row)
                print(f"{k:>5}x{n:<5} rows {rows:>4} {name:<28} " + "  ".join(
                    f"{m} {row[f'{m}_ms']:.3f} ms ({row[f'{m}_tflops']:.0f} TF/s, err "
                    f"{row[f'{m}_rel_err']:.4f})" if f"{m}_ms" in row else
                    f"{m} ERR {row.get(f'{m}_error', '')[:80]}" for m in ("eager", "compiled")),
                    flush=True)
            del layer
            torch._dynamo.reset()
    write_json(args.json, {"environment": environment(torch.device("cuda")), "rows": results})


if __name__ == "__main__":
    main()
