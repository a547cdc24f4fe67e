"""Nothing is ever lost: atomic files and folders under kill -9 and a full disk, each study's
outputs kept apart, and a reference cache that never hands back an image made another way."""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import autoquant
from autoquant import _atomic

from . import helpers

ROOT = Path(__file__).resolve().parents[1]


def _recipe(bits: int) -> autoquant.Recipe:
    return autoquant.Recipe.from_dict({"format": "autoquant-recipe/1",
                                       "default": {"method": "hqq", "bits": bits,
                                                   "group_size": 32}})


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))


def _saved_bits(folder: Path) -> int:
    """Load the folder the way a user does; the bits of its layers (one value)."""
    model = autoquant.load_quantized(folder, base=_base())
    bits = {c.bits for c in autoquant.applied_state(model).configs.values()}
    assert len(bits) == 1
    return bits.pop()


# -- kill -9 at each write point ---------------------------------------------------------------
CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    from torch import nn
    import autoquant
    from autoquant import _atomic, persist

    point, target, bits = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)

    def then_die(fn):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            die()
            return out
        return wrapped

    def nth_dies(fn, n):
        calls = []
        def wrapped(*a, **k):
            calls.append(1)
            if len(calls) == n:
                die()
            return fn(*a, **k)
        return wrapped

    def half_then_die(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
            f.flush()
            os.fsync(f.fileno())
        die()

    patches = {
        "folder-mid-write": lambda: setattr(persist, "save_file", half_then_die),
        "folder-before-swap": lambda: setattr(_atomic, "_fsync_tree", then_die(_atomic._fsync_tree)),
        "folder-after-swap": lambda: setattr(_atomic, "_exchange", then_die(_atomic._exchange)),
        "folder-removing-old": lambda: setattr(_atomic.shutil, "rmtree", die),
        "folder-fallback-between-renames": lambda: (
            setattr(_atomic, "_exchange", lambda a, b: False),
            setattr(_atomic.os, "rename", nth_dies(_atomic.os.rename, 2))),
        "file-before-fsync": lambda: setattr(_atomic, "_fsync_file", die),
        "file-before-rename": lambda: setattr(_atomic.os, "replace", die),
        "file-after-rename": lambda: setattr(_atomic.os, "replace", then_die(_atomic.os.replace)),
    }
    recipe = autoquant.Recipe.from_dict({"format": "autoquant-recipe/1",
                                         "default": {"method": "hqq", "bits": bits,
                                                     "group_size": 32}})
    patches[point]()
    if point.startswith("file"):
        recipe.save(target)
    else:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        autoquant.apply_recipe(model, recipe, progress=False)
        autoquant.save_quantized(model, target)
    print("finished")
""")

#: point -> what a reader finds after the kill: the old (4-bit) or the new (8-bit) version
POINTS = {"folder-mid-write": 4, "folder-before-swap": 4, "folder-after-swap": 8,
          "folder-removing-old": 8, "folder-fallback-between-renames": 4,
          "file-before-fsync": 4, "file-before-rename": 4, "file-after-rename": 8}


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_at_any_write_point_leaves_a_complete_old_or_new_version(point, tmp_path):
    target = tmp_path / ("recipe.yaml" if point.startswith("file") else "saved")
    if point.startswith("file"):
        _recipe(4).save(target)
    else:
        model = _base()
        autoquant.apply_recipe(model, _recipe(4), progress=False)
        autoquant.save_quantized(model, target)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", CHILD, point, str(target), "8"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, (run.returncode, run.stderr[-2000:])
    assert "finished" not in run.stdout
    if point.startswith("file"):
        found = autoquant.load_recipe(target).default.bits
    else:
        found = _saved_bits(target)
    assert found == POINTS[point]
    # and the next save goes through, whatever the crash left beside the target
    if not point.startswith("file"):
        model = _base()
        autoquant.apply_recipe(model, _recipe(2), progress=False)
        autoquant.save_quantized(model, target)
        assert _saved_bits(target) == 2
        assert not target.with_name(target.name + _atomic.ASIDE).exists()


# -- a full disk -------------------------------------------------------------------------------
@contextlib.contextmanager
def full_disk(tmp_path: Path, size: str = "2m"):
    disk = tmp_path / "disk"
    disk.mkdir()
    with helpers.full_disk(disk, size) as fill:
        yield disk, fill


def _entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_a_full_disk_keeps_the_old_recipe_and_the_old_saved_folder(tmp_path):
    with full_disk(tmp_path) as (disk, fill):
        recipe_path = disk / "recipe.yaml"
        _recipe(4).save(recipe_path)
        model = _base()
        autoquant.apply_recipe(model, _recipe(4), progress=False)
        autoquant.save_quantized(model, disk / "saved")
        old_recipe = recipe_path.read_bytes()
        fill()
        before = _entries(disk)
        big = autoquant.Recipe.from_dict({"format": "autoquant-recipe/1", "layers": {
            f"layer_{i}_" + "x" * 200: {"method": "none"} for i in range(2000)}})
        with pytest.raises(OSError) as e:
            big.save(recipe_path)
        assert e.value.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        assert recipe_path.read_bytes() == old_recipe
        model = _base()
        autoquant.apply_recipe(model, _recipe(8), progress=False)
        with pytest.raises(OSError):
            autoquant.save_quantized(model, disk / "saved")
        assert _saved_bits(disk / "saved") == 4
        assert _entries(disk) == before  # no temporary file or folder left behind


def test_the_command_line_says_the_disk_is_full_in_one_line_and_keeps_the_old_file(tmp_path):
    from autoquant.cli.commands import main

    with full_disk(tmp_path, "64k") as (disk, fill):
        out = disk / "recipe.yaml"
        out.write_text("old\n")
        fill()
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["baseline", "--model", "tiny-flux", "--method", "hqq", "--bits", "4",
                         "--out", str(out)])
        assert code == 1
        text = err.getvalue()
        assert "Traceback" not in text and "disk is full" in text, text
        assert len(text.strip().splitlines()) == 1
        assert out.read_text() == "old\n"


def test_save_quantized_refuses_a_folder_holding_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    model = _base()
    autoquant.apply_recipe(model, _recipe(4), progress=False)
    with pytest.raises(autoquant.InputError, match="holds other files"):
        autoquant.save_quantized(model, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_written_files_keep_the_usual_permissions(tmp_path):
    path = _recipe(4).save(tmp_path / "r.yaml")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


# -- outputs per study ---------------------------------------------------------------------------
def test_a_second_search_into_the_same_out_keeps_the_first_studys_outputs(tmp_path):
    from .test_search import make_search

    first = autoquant.run_search(make_search(tmp_path, budget="40%", trials=3))
    first_best = Path(first["best"]["study_recipe"])
    first_text = first_best.read_text()
    first_pareto = {p: p.read_text() for p in (first_best.parent / "pareto").glob("*.yaml")}
    second = autoquant.run_search(make_search(tmp_path, budget="60%", trials=3))
    out = tmp_path / "out"
    assert first["study"] != second["study"]
    assert first_best.read_text() == first_text  # untouched
    assert {p: p.read_text() for p in first_pareto} == first_pareto
    assert autoquant.load_recipe(first_best).budget["spec"] == "40%"
    second_best = Path(second["best"]["study_recipe"])
    assert second_best.parent != first_best.parent
    assert autoquant.load_recipe(second_best).budget["spec"] == "60%"
    # the top of --out holds the last study that finished
    assert (out / "best.yaml").read_text() == second_best.read_text()


def test_study_folders_are_safe_and_distinct_for_any_name(tmp_path):
    from autoquant.search._outputs import study_folder

    names = ["autoquant-demo-30%", "../../etc", "a/b", "a_b", ".hidden", "x" * 300, "é"]
    folders = [study_folder(tmp_path, n) for n in names]
    assert len(set(folders)) == len(names)
    for f in folders:
        assert f.parent == tmp_path / "studies" and not f.name.startswith(".")
        assert "/" not in f.name and f.name not in ("..", ".")


# -- the reference cache -------------------------------------------------------------------------
def test_full_precision_scores_inf_against_cached_references_for_every_setting(tmp_path):
    """One cache shared by every combination of what a user can change: batch size, where the
    scoring is cut (the search's first stage), threads, weights' dtype. Each evaluator reads what
    the earlier ones cached: an image made another way would score below inf."""
    from autoquant.scoring.evaluator import Evaluator
    from autoquant.scoring.references import ReferenceCache
    from autoquant.generation.settings import EvalSettings

    cache = ReferenceCache(tmp_path / "refs")
    base = EvalSettings.for_model("demo", "holdout", seeds=[3])
    threads = torch.get_num_threads()
    pipes = {dtype: autoquant.load_pipeline("demo", dtype=dtype)
             for dtype in ("bfloat16", "float32")}
    seen = []
    try:
        for dtype, batch, cut, n_threads in itertools.product(
                pipes, (1, 3), ((), (2,)), sorted({1, max(2, threads)})):
            torch.set_num_threads(n_threads)
            settings = EvalSettings(**{**base.__dict__, "prompts": base.prompts[:4],
                                       "batch_size": batch})
            ev = Evaluator(pipes[dtype], settings, clip=None, cache=cache, progress=False,
                           segments=cut)
            full = ev.evaluate(None)
            assert full.metrics["psnr"]["worst"] == float("inf"), (dtype, batch, cut, n_threads)
            if cut:  # the stages a search scores, each against the same references
                first, _, _ = ev.score(list(range(cut[0])))
                assert first["psnr"]["worst"] == float("inf")
            seen.append(ev.references_generated)
    finally:
        torch.set_num_threads(threads)
    assert any(n == 0 for n in seen)  # the cache was used where nothing changed


def test_a_batch_made_in_part_is_made_whole(tmp_path):
    """With one image of a batch missing from the cache, the whole batch is made again (its
    companions shape its pixels), and the rest is read back."""
    from autoquant.scoring.evaluator import Evaluator
    from autoquant.scoring.references import ReferenceCache
    from autoquant.generation.settings import EvalSettings

    pipe = autoquant.load_pipeline("demo")
    base = EvalSettings.for_model("demo", "holdout", seeds=[5])
    settings = EvalSettings(**{**base.__dict__, "prompts": base.prompts[:4], "batch_size": 2})
    cache = ReferenceCache(tmp_path)
    Evaluator(pipe, settings, clip=None, cache=cache, progress=False)
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 4
    files[0].unlink()
    ev = Evaluator(pipe, settings, clip=None, cache=cache, progress=False)
    assert ev.references_generated == 2
    assert ev.evaluate(None).metrics["psnr"]["worst"] == float("inf")
