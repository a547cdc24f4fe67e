#!/usr/bin/env bash
# The issue-34 GPU call: attention kernels alone, the fp8_int4 GPU tests, demo-flux quality under
# the real fp8_int4 kernels, one Flux-dev step per attention backend (with a kernel-time profile).
# Run on the device machine after unpacking .sitepack (see bench/pack_device_site.sh).
set -u
R=${OUT:-out/gpu34}; mkdir -p "$R"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 70 python bench/attention_probe.py --json "$R/attention_probe.json" 2>&1 | grep -v Warning | tail -12
timeout 150 python -m pytest -q -m gpu tests/test_fp8_int4_gpu.py tests/test_backend_contract.py \
  -k "fp8_int4 or fp8_rows or flux_transformer or pin or fp8_dynamic" -p no:cacheprovider 2>&1 | tail -8
timeout 150 python bench/demo_flux_gpu.py run --configs \
  "torchao fp8_dynamic (per row),torchao fp8_int4 (int4 weights x fp8 activations),torchao fp8_int4_plain,hqq 4-bit g64" \
  --plans bench/results/flux_latency_fastest_h100.json --json "$R/demo_flux_gpu_fastest.json" 2>&1 | grep -v "Warning\|warn" | tail -8
timeout 210 python bench/flux_speed.py --plans bf16,fp8_row,fp8_int4 --modes default \
  --attention native,_native_cudnn,sage1 --profile --json "$R/flux_speed_attention.json" 2>&1 | grep -v "Warning\|warn" | tail -24
