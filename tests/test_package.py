"""The package as users get it: a built wheel installed (not editable) runs a search; the entry
points work; importing is cheap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(AUTOQUANT_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv (seeing this interpreter's packages, not this checkout) with the wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp / "dist"), str(ROOT)], check=True, cwd=tmp)
    wheel = next((tmp / "dist").glob("autoquant-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp / "venv")],
                   check=True)
    subprocess.run([str(tmp / "venv" / "bin" / "python"), "-m", "pip", "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, cwd=tmp)
    return tmp


def test_the_wheel_ships_prompts_and_spaces_and_its_cli_runs_a_search(installed):
    python = installed / "venv" / "bin" / "python"
    env = _env(installed)
    where = subprocess.run([str(python), "-c", "import autoquant.space as s; "
                            "print(s.__file__); print(s.spaces())"],
                           check=True, capture_output=True, text=True, cwd=installed, env=env)
    module, spaces = where.stdout.strip().splitlines()
    assert module.startswith(str(installed / "venv")), module  # not this checkout
    assert "default" in spaces and "flux" in spaces
    prompts = installed / "prompts.txt"
    prompts.write_text("a photo of a bag\na drawing of a coat\n")
    run = subprocess.run([str(installed / "venv" / "bin" / "autoquant"), "search", "--model",
                          "demo", "--budget", "30%", "--trials", "1", "--space", "hqq-only",
                          "--sensitivity", "anchored", "--prompts", str(prompts), "--seeds", "0",
                          "--out", str(installed / "out"), "--json"],
                         capture_output=True, text=True, cwd=installed, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert report["best"]["bytes"] <= report["budget_bytes"]
    assert (installed / "out" / "best.yaml").is_file()


def test_python_dash_m_and_the_console_script_agree(tmp_path):
    env = _env(tmp_path)
    a = subprocess.run([sys.executable, "-m", "autoquant", "--version"], capture_output=True,
                       text=True, env=env, check=True)
    assert a.stdout.startswith("autoquant ")
    b = subprocess.run([sys.executable, "-m", "autoquant", "search", "--model", "demo",
                        "--budget", "lots"], capture_output=True, text=True, env=env)
    assert b.returncode == 2 and "budget 'lots'" in b.stderr


def test_import_is_cheap_and_reaches_every_documented_name(tmp_path):
    code = ("import sys, autoquant; heavy = [m for m in ('torch', 'diffusers', 'optuna') "
            "if m in sys.modules]; print(heavy); "
            "print(autoquant.zoo.DEMO_GENERATION['num_inference_steps']); "
            "print(sorted(n for n in autoquant.__all__ if not hasattr(autoquant, n)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(tmp_path), check=True).stdout.splitlines()
    assert out[0] == "[]"  # nothing heavy until it is used
    assert out[1] == "12"
    assert out[2] == "[]"  # every name in __all__ resolves


def test_the_demo_pipeline_called_plainly_uses_the_demo_defaults():
    import torch

    import autoquant

    pipe = autoquant.load_pipeline("demo")
    image = pipe("a coat", generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_the_readme_holds_no_unrendered_template():
    """Numbers in the README are written out, never a leftover ``{b["cases"]}``-style field."""
    import re

    text = (ROOT / "README.md").read_text()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks may hold any brace
    prose = re.sub(r"`[^`\n]*`", "", prose)
    fields = re.findall(r"\{[^{}\n]*\}", prose)
    assert not fields, fields[:5]
