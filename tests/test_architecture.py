"""The house: the package's import graph has no circle, and what version 0.2.0 wrote still loads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import autoquant

ROOT = Path(__file__).resolve().parents[1]
V02 = Path(__file__).parent / "data" / "v0.2"
sys.path.insert(0, str(ROOT / "bench"))
from import_graph import cycles, graph  # noqa: E402


def test_the_import_graph_has_no_circle():
    """Every module is parsed (imports inside functions count); a circle fails naming it."""
    edges = graph()
    assert len(edges) > 50
    found = cycles(edges)
    assert not found, "import circle(s): " + "; ".join(" -> ".join(c) for c in found)


def test_the_cycle_check_finds_a_planted_circle(tmp_path):
    pkg = tmp_path / "autoquant"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    assert cycles(graph(pkg)) == [["autoquant.a", "autoquant.b"]]


def test_a_folder_recipe_and_study_written_by_0_2_still_load():
    """Fixtures written by autoquant 0.2.0 (tests/data/v0.2): the saved folder rebuilds the same
    pipeline (its image the one saved then), the recipe resolves, the study's report is written."""
    from safetensors.torch import load_file

    recipe = autoquant.load_recipe(V02 / "recipe.yaml")
    pipe = autoquant.load_quantized(V02 / "saved")
    assert autoquant.applied_state(pipe).recipe.layers == recipe.layers
    recipe.resolve(autoquant.inventory(autoquant.load_pipeline("tiny-flux", dtype="bfloat16")))
    image = pipe("a red cat", num_inference_steps=2, height=32, width=32, output_type="pt",
                 generator=torch.Generator().manual_seed(autoquant.noise_seed("a red cat", 0))
                 ).images.float()
    saved = load_file(str(V02 / "saved-image.safetensors"))["image"]
    # bit-identical here (same torch, same CPU); another torch may round a matmul differently
    assert (image - saved).abs().max() < 2e-2
    best = autoquant.load_recipe(V02 / "best.yaml")
    assert best.budget["spec"] == "45%"


def test_the_0_2_study_opens_in_the_explorer(tmp_path):
    import shutil

    from autoquant import explore

    shutil.copy(V02 / "study.db", tmp_path / "study.db")
    view = explore.open_study(tmp_path)
    assert view.best is not None and len(view.trials) >= 3
    html = explore.write_report(view, tmp_path / "report.html").read_text()
    assert "<table>" in html
