"""The house: rooms by concern whose imports run one way and close no circle; the old module
paths still work, and what version 0.2.0 wrote still loads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import autoquant

ROOT = Path(__file__).resolve().parents[1]
V02 = Path(__file__).parent / "data" / "v0.2"
sys.path.insert(0, str(ROOT / "bench"))
from import_graph import LAYERS, cycles, graph, room, upward  # noqa: E402


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


def test_every_module_is_in_a_room_and_imports_run_downward():
    edges = graph()
    homeless = sorted(m for m in edges if room(m) is None)
    assert not homeless, f"modules in no room of LAYERS: {homeless}"
    up = upward(edges)
    assert not up, "imports running upward: " + "; ".join(f"{a} -> {b}" for a, b in up)
    flat = [m for m in edges if m.count(".") == 1 and room(m) == "helpers"]
    assert all(m.split(".")[1].startswith("_") for m in flat)


def test_the_room_check_finds_an_upward_import(tmp_path):
    pkg = tmp_path / "autoquant"
    for sub in ("plans", "search", "attic"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "search" / "x.py").write_text("from ..plans import y\n")  # downward: fine
    (pkg / "plans" / "y.py").write_text("def f():\n    from ..search.x import g\n")
    (pkg / "attic" / "z.py").write_text("")
    edges = graph(pkg)
    assert upward(edges) == [("autoquant.plans.y", "autoquant.search.x")]
    assert room("autoquant.attic.z") is None and "attic" not in LAYERS


#: literals that spell a method's name but mean something else: (file below autoquant/, literal)
NOT_A_METHOD = {
    ("cli/parser.py", "none"),  # --protect none: protect no layer
    ("scoring/baseline.py", "none"),  # the same option
    ("scoring/baseline.py", ": choose 'none' or 'default'"),
    ("scoring/metrics.py", "none"),  # torchmetrics' reduction="none"
    # the GGUF file format (its writer, the export verb's choice), named as backends declare it
    # in Backend.formats -- which layers a GGUF file holds is asked of the registry
    ("export/gguf.py", "gguf"), ("cli/parser.py", "gguf"),
}


def backend_literals(root: Path, names: set[str]) -> list[tuple[str, int, str]]:
    """``(file, line, literal)`` for every string literal outside ``backends/`` (docstrings
    aside; f-string parts count) that holds one of ``names`` as a word."""
    import ast
    import re

    word = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True)))
                      + r")(?!\w)")
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("backends/"):
            continue
        tree = ast.parse(path.read_text(), rel)
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and n.body and isinstance(n.body[0], ast.Expr)
                and isinstance(n.body[0].value, ast.Constant)}
        for n in ast.walk(tree):
            if (isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
                    and word.search(n.value) and (rel, n.value) not in NOT_A_METHOD):
                found.append((rel, n.lineno, n.value))
    return found


def registry_names() -> set[str]:
    from autoquant.backends import describe

    out = set()
    for m in describe():
        out |= {m["method"], *m["configs"]} | {v for v in (m["package"], m["import"]) if v}
    return out


def test_no_module_outside_backends_names_a_method_or_its_package():
    """The registry is the one truth about a backend: a method's name, config labels and
    package appear as string literals only in ``backends/`` (docstrings aside)."""
    names = registry_names()
    assert {"hqq", "bitsandbytes", "torchao", "gptq", "higgs", "hqq4-g64"} <= names
    found = backend_literals(ROOT / "autoquant", names)
    assert not found, "backend knowledge outside backends/: " + "; ".join(
        f"{f}:{line} {text[:60]!r}" for f, line, text in found)


def test_the_literal_check_finds_a_planted_method_name(tmp_path):
    (tmp_path / "backends").mkdir()
    (tmp_path / "backends" / "x.py").write_text('M = "hqq"\n')  # its own room: fine
    (tmp_path / "cli.py").write_text('"""Docs may say hqq."""\nCHOICES = ["hqq", "bnb4-nf4"]\n'
                                     'msg = f"pip install {x} bitsandbytes"\nok = "hqq4x"\n')
    found = backend_literals(tmp_path, registry_names())
    assert [(f, line, t) for f, line, t in found] == [
        ("cli.py", 2, "hqq"), ("cli.py", 2, "bnb4-nf4"), ("cli.py", 3, " bitsandbytes")]


@pytest.mark.parametrize("old, new", sorted(autoquant.MOVED.items()))
def test_an_old_module_path_gives_the_module_at_its_new_path(old, new):
    import importlib

    assert importlib.import_module(f"autoquant.{old}") is importlib.import_module(f"autoquant.{new}")


def test_the_0_2_import_lines_users_wrote_still_work():
    from autoquant.apply import apply_recipe, compile_pipeline
    from autoquant.evaluator import Evaluator
    from autoquant.recipe import FORMAT, load_recipe
    from autoquant.zoo import DEMO_DIR

    assert apply_recipe is autoquant.apply_recipe and compile_pipeline is autoquant.compile_pipeline
    assert Evaluator is autoquant.Evaluator and load_recipe is autoquant.load_recipe
    assert FORMAT == autoquant.RECIPE_FORMAT and DEMO_DIR.is_dir()
    assert autoquant.explore.__name__ == "autoquant.explore"


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
