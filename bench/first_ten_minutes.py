"""The README's two commands, timed as a new user runs them: a fresh clone (of this checkout's
HEAD), a fresh ``$AUTOQUANT_CACHE``, the commands copied from the README's first code block.

    python bench/first_ten_minutes.py [--no-bf16] [--skip-tests] [--json bench/results/first_ten_minutes.json]

``pip install`` is timed too but uses this environment (the packages are already there: a
fresh venv's install is the download, not autoquant); it points this environment's editable
autoquant at the clone, and back at this checkout when done. ``--no-bf16`` runs as on a CPU without
bfloat16 instructions (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``: PyTorch's kernels
and oneDNN limited to AVX2, so ``--dtype auto`` picks float32), the machine class of the issue.
Also times ``autoquant --help``, a malformed budget's error, and 8 demo images.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import environment, write_json

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def timed(cmd: str, cwd: Path, env: dict) -> dict:
    t = time.perf_counter()
    proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True)
    return {"command": cmd, "seconds": time.perf_counter() - t, "exit": proc.returncode,
            "tail": (proc.stdout + proc.stderr)[-1500:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.json = args.json or ("bench/results/first_ten_minutes" +
                              ("_no_bf16" if args.no_bf16 else "") + ".json")
    tmp = Path(tempfile.mkdtemp(prefix="first-ten-"))
    subprocess.run(["git", "clone", "-q", str(ROOT), str(tmp / "autoquant")], check=True)
    clone = tmp / "autoquant"
    env = {**os.environ, "AUTOQUANT_CACHE": str(tmp / "cache")}
    env.pop("PYTHONPATH", None)
    if args.no_bf16:
        env.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    search_cmd, test_cmd = readme_commands()[:2]
    out: dict = {"environment": environment(), "no_bf16": args.no_bf16, "runs": {}}
    dtype = subprocess.run([sys.executable, "-c", "from autoquant.models.pipelines import "
                            "default_dtype; print(default_dtype('cpu'))"], env=env,
                           capture_output=True, text=True, cwd=clone).stdout.strip()
    out["dtype"] = dtype
    install, search = search_cmd.split(" && ", 1)
    pip = f"{sys.executable} -m pip "
    out["runs"]["install"] = timed(install.replace("pip ", pip, 1)
                                   + " --no-deps --no-build-isolation -q", clone, env)
    try:
        run_the_rest(out, search, test_cmd, clone, env, args)
    finally:  # the install pointed this environment's autoquant at the clone: point it back
        subprocess.run(f"{pip} install -e . --no-deps --no-build-isolation -q", shell=True,
                       cwd=ROOT, check=True)
    for name, r in out["runs"].items():
        print(f"{name:11s} {r['seconds']:7.1f} s  exit {r['exit']}  {r['command'][:90]}")
    images = re.search(r"8 images ([0-9.]+)", out["runs"]["images"]["tail"])
    out["eight_images_s"] = float(images.group(1)) if images else None
    print(f"dtype {dtype}; 8 demo images {out['eight_images_s']} s")
    write_json(args.json, out)
    return 0


def run_the_rest(out: dict, search: str, test_cmd: str, clone: Path, env: dict, args) -> None:
    out["runs"]["search"] = timed(search, clone, env)
    out["runs"]["help"] = timed("autoquant --help > /dev/null", clone, env)
    out["runs"]["bad_budget"] = timed("autoquant search --model demo --budget lots", clone, env)
    out["runs"]["images"] = timed(
        f"{sys.executable} -c \"import time, torch, autoquant; p = autoquant.load_pipeline('demo');"
        f" p(['a coat'] * 8); t = time.perf_counter(); p(['a photo of a sneaker'] * 8, "
        f"generator=torch.Generator().manual_seed(0)); print('8 images', "
        f"time.perf_counter() - t)\"", clone, env)
    if not args.skip_tests:
        test = test_cmd.split(" && ", 1)[1]
        out["runs"]["tests"] = timed(test, clone, env)


if __name__ == "__main__":
    sys.exit(main())
