"""Every GGUF type of the ``gguf`` backend, on real-shaped weights: bit-identity of autoquant's
codes with one plain ggml_quantize_chunk call, the relative weight error, bytes = GGUF's block
formula (and = the layer's measured bytes), quantize speed here, and what an importance matrix
does to the importance-weighted output error at equal bytes.

    python bench/gguf_types.py [--rows 1024] [--cols 3072] [--json bench/results/gguf_types.json]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time

import numpy as np
import torch

from autoquant._format import table
from autoquant.backends import config_from_dict, get_backend, quantize_layer
from autoquant.backends._hessians import observe
from autoquant.backends.gguf import TYPES
from autoquant.backends.measure import measured_bytes

from _common import environment, write_json


def ggml_once(w: np.ndarray, type_id: int, imatrix=None) -> np.ndarray:
    import ggml

    rows, n = w.shape
    out = np.zeros(ggml.ggml_row_size(type_id, n) * rows, dtype=np.uint8)
    ggml.ggml_quantize_chunk(type_id, w.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                             out.ctypes.data_as(ctypes.c_void_p), 0, rows, n,
                             None if imatrix is None else
                             imatrix.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
    return out.reshape(rows, -1)


def main(argv=None) -> int:
    import gguf

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=3072)
    ap.add_argument("--json", default="bench/results/gguf_types.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    lin = torch.nn.Linear(args.cols, args.rows, bias=False).requires_grad_(False)
    # activations with a skewed per-channel scale, as real layers' inputs are
    scale = torch.exp(torch.randn(args.cols))
    x = torch.randn(4096, args.cols) * scale
    observe(lin, x)
    w = lin.weight.float().numpy()
    backend = get_backend("gguf")
    rows, records = [], []
    for name, (type_id, weights, nbytes) in TYPES.items():
        cfg = config_from_dict({"method": "gguf", "type": name})
        t = time.perf_counter()
        q = quantize_layer(lin, cfg, torch.device("cpu"))
        seconds = time.perf_counter() - t
        codes = q.weight.as_tensor().numpy()
        identical = bool(np.array_equal(codes, ggml_once(w, type_id)))
        deq = gguf.dequantize(codes, gguf.GGMLQuantizationType[name])
        rel = float(np.linalg.norm(deq - w) / np.linalg.norm(w))
        formula = args.rows * args.cols // weights * nbytes
        assert formula == backend.nbytes(cfg, args.rows, args.cols, False, torch.float32)
        errs = {}
        for imat in (False, True):
            c = config_from_dict({"method": "gguf", "type": name, "imatrix": imat})
            layer = q if not imat else quantize_layer(lin, c, torch.device("cpu"))
            with torch.no_grad():
                errs[imat] = ((layer(x[:512]) - lin(x[:512])).pow(2).mean()
                              / lin(x[:512]).pow(2).mean()).item()
        rec = {"type": name, "bits_per_weight": 8 * nbytes / weights, "bit_identical": identical,
               "relative_weight_error": rel, "bytes": formula,
               "measured_bytes": measured_bytes(q), "bytes_match": measured_bytes(q) == formula,
               "weights_per_s": args.rows * args.cols / seconds,
               "output_error": errs[False], "output_error_imatrix": errs[True],
               "imatrix_cut": 1 - errs[True] / errs[False]}
        records.append(rec)
        rows.append([name, f"{rec['bits_per_weight']:.3f}", "yes" if identical else "NO",
                     f"{rel:.4f}", f"{formula:,}", "yes" if rec["bytes_match"] else "NO",
                     f"{rec['weights_per_s'] / 1e6:.1f}", f"{errs[False]:.2e}",
                     f"{errs[True]:.2e}", f"{rec['imatrix_cut']:+.0%}"])
    print(table(rows, ["type", "bits/w", "= ggml", "rel. weight err", "bytes",
                       "= measured", "M weights/s", "out err", "out err imatrix",
                       "imatrix cut"]))
    write_json(args.json, {"environment": environment(), "shape": [args.rows, args.cols],
                           "types": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
