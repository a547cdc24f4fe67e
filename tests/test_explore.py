"""Exploring a finished search: the notebook runs headless, the HTML report is self-contained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import autoquant
from autoquant import AutoquantError, explore
from autoquant.cli.commands import main

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "pareto_explorer.ipynb"


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    assert main(["search", "--model", "tiny-flux", "--budget", "45%", "--trials", "5",
                 "--sensitivity", "anchored", "--space", "hqq-only", "--seeds",
                 "0", "--no-clip", "--out", str(out), "--json"]) == 0
    return out


def test_committed_notebook_has_no_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


def test_notebook_runs_top_to_bottom_on_a_fresh_study(study_dir, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("AUTOQUANT_OUT", str(study_dir))
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    kinds = [k for c in nb.cells if c.cell_type == "code" for o in c.outputs
             for k in o.get("data", {})]
    assert kinds.count("application/vnd.plotly.v1+json") == 2  # the front and the bit map
    assert kinds.count("image/png") == 2  # full precision and the candidate
    assert "text/html" in kinds  # the trials table
    assert list(tmp_path.glob("trial-*.yaml"))  # the exported recipe
    exported = autoquant.load_recipe(next(tmp_path.glob("trial-*.yaml")))
    exported.resolve(autoquant.inventory(autoquant.load_pipeline("tiny-flux")))


def test_report_html_is_self_contained(study_dir, capsys):
    assert main(["report", "--out", str(study_dir)]) == 0
    html = (study_dir / "report.html").read_text()
    import re

    assert "Plotly.newPlot" in html
    # nothing is fetched: no external scripts, stylesheets or images
    assert not re.search(r"<script[^>]+src=", html)
    assert not re.search(r"<link[^>]+href=['\"]https?:", html)
    assert not re.search(r"<img[^>]+src=['\"]https?:", html)
    assert html.count("data:image/png;base64,") >= 2


def test_view_of_the_study(study_dir):
    view = explore.open_study(study_dir)
    assert view.best is not None and view.best.bytes <= view.budget
    configs = view.layer_configs(view.best)
    assert len(configs) == sum(1 for l in autoquant.inventory(
        autoquant.load_pipeline("tiny-flux")) if l.component == "transformer")
    assert view.bits("hqq4-g64") == 4 and view.bits("none") == 16
    assert explore.images_png(view, None)[:4] == b"\x89PNG"


def test_open_study_errors(tmp_path):
    with pytest.raises(AutoquantError, match="holds no study.db"):
        explore.open_study(tmp_path)


def test_export_works_for_a_space_file_and_carries_the_fingerprint(tmp_path):
    import yaml

    space = tmp_path / "my-space.yaml"
    space.write_text(yaml.safe_dump({"format": "autoquant-space/1", "candidates": [
        {"method": "hqq", "bits": 4, "group_size": 32}, {"method": "bnb", "bits": 8},
        {"method": "none"}]}))
    out = tmp_path / "o"
    assert main(["search", "--model", "tiny-flux", "--budget", "50%", "--space", str(space),
                 "--sensitivity", "anchored",
                 "--trials", "2", "--seeds", "0", "--no-clip", "--out", str(out), "--json",
                 "--dtype", "auto"]) == 0
    space.unlink()  # the study alone must be enough
    view = explore.open_study(out)
    path = explore.export_recipe(view, view.best, tmp_path / "exported.yaml")
    exported, searched = autoquant.load_recipe(path), autoquant.load_recipe(out / "best.yaml")
    assert exported.model["fingerprint"] == searched.model["fingerprint"]
    assert exported.layers == searched.layers
