#!/usr/bin/env bash
# Issue 34, second GPU call: the fp8_int4 GPU tests after their tolerance fix, then bf16 / fp8 /
# fp8_int4 steps under max-autotune (Inductor's GEMM templates tuned against cuBLAS) beside the
# default mode, each profiled.
set -u
R=${OUT:-out/gpu34}; mkdir -p "$R"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python -m pytest -q -m gpu tests/test_fp8_int4_gpu.py -p no:cacheprovider --tb=line -W ignore 2>&1 | grep -v "Warning\|warn" | tail -8
timeout 440 python bench/flux_speed.py --plans bf16,fp8_row,fp8_int4 --modes default,max-autotune-no-cudagraphs \
  --profile --json "$R/flux_speed_autotune.json" 2>&1 | grep -v "Warning\|warn\|Attention backends" | tail -24
