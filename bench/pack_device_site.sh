#!/usr/bin/env bash
# Packs what the GPU machine lacks into ONE xz tarball, .sitepack/site312.tar.xz: every wheel in
# .whl/ (../shared/tools/device-wheels.sh downloads them) plus mslk-cuda's Python 3.12 wheel
# (torchao's fp8_int4 kernels), unpacked. mslk's 44 MB wheel (a 254 MB .so, deflated) recompresses
# to ~10 MB with xz; the whole set to ~28 MB, so it travels with the 35 MB repository inside one
# device call's 64 MiB (the wheels as wheels, with mslk, would not). About 2 minutes here.
#
#   bash bench/pack_device_site.sh
#   device command: python3 -c "import tarfile;tarfile.open('.sitepack/site312.tar.xz').extractall('/tmp/site')" \
#       && export PYTHONPATH=/tmp/site:$PWD:$PWD/bench; ...   (carry: [".sitepack/site312.tar.xz"])
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
mkdir -p .sitepack .git/info
grep -qx '/.sitepack/' .git/info/exclude 2>/dev/null || echo '/.sitepack/' >> .git/info/exclude
ls .whl/*.whl >/dev/null || { echo "no wheels in .whl/: run ../shared/tools/device-wheels.sh" >&2; exit 1; }
# mslk stays out of .whl/ (carried as it is, .whl/ must stay under 64 MiB with the repository)
mkdir -p .sitepack/extra
ls .sitepack/extra/mslk_cuda-*-cp312-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps \
    --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .sitepack/extra "mslk-cuda==1.1.0" 2>&1 \
    | grep -v '^WARNING: Location' || true
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
for w in .whl/*.whl .sitepack/extra/*.whl; do python3 -m zipfile -e "$w" "$site"; done
tar -C "$site" -cf - . | xz -T0 -9 > .sitepack/site312.tar.xz.tmp
mv .sitepack/site312.tar.xz.tmp .sitepack/site312.tar.xz
du -h .sitepack/site312.tar.xz
