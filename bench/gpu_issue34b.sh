#!/usr/bin/env bash
# Issue 34, second GPU call: the fp8_int4 GPU tests after their tolerance fix and the fp8-aware
# codes (and the contract suite's fp8_int4 cases); demo-flux again with CLIP fidelity (the demo's
# CLIP) beside PSNR, fp8_int4's new codes beside mslk's in the same call; then bf16 / fp8 /
# fp8_int4 steps under max-autotune (Inductor's GEMM templates tuned against cuBLAS) beside the default mode, profiled.
set -u
R=${OUT:-out/gpu34}; mkdir -p "$R"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python -m pytest -q -m gpu tests/test_fp8_int4_gpu.py tests/test_backend_contract.py -k "fp8_int4 or fp8_rows or flux_transformer or pin or preshuffled" -p no:cacheprovider --tb=line -W ignore 2>&1 | grep -v "Warning\|warn" | tail -8
timeout 200 python bench/demo_flux_gpu.py run --configs \
  "torchao fp8_dynamic (per row),torchao fp8_int4 (int4 weights x fp8 activations),torchao fp8_int4 with mslk's round-to-nearest codes,torchao fp8_int4_plain,hqq 4-bit g64,bnb nf4" \
  --plans bench/results/flux_latency_fastest_h100.json --json "$R/demo_flux_gpu_clip.json" 2>&1 | grep -v "Warning\|warn" | tail -10
timeout 220 python bench/flux_speed.py --plans bf16,fp8_row,fp8_int4 --modes default,max-autotune-no-cudagraphs \
  --profile --json "$R/flux_speed_autotune.json" 2>&1 | grep -v "Warning\|warn\|Attention backends" | tail -24
