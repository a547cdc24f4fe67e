"""The search: budgets, spaces, constraints, outputs, resume, failures (on tiny-flux, CPU)."""

from __future__ import annotations

import dataclasses
import json

import optuna
import pytest
import yaml

import autoquant
from autoquant import AutoquantError
from autoquant.cli.commands import main
from autoquant.search import Search, SearchConfig, run_search
from autoquant.generation.settings import EvalSettings
from autoquant.search.space import SearchSpace, SpaceError, load_space, parse_budget

SPACE = {"format": "autoquant-space/1",
         "candidates": [{"method": "hqq", "bits": 2, "group_size": 32},
                        {"method": "hqq", "bits": 4, "group_size": 32},
                        {"method": "hqq", "bits": 8, "group_size": 32},
                        {"method": "none"}],
         "tie": ["re:(transformer\\.(?:single_)?transformer_blocks\\.\\d+\\.attn)\\.to_[qkv]"],
         "fp_cap": 0.2}


def make_search(tmp_path, budget="40%", trials=6, resume=False, space=None, prepare=False,
                sensitivity="anchored"):
    """A search on tiny-flux; anchored sensitivity unless a test is about the full table."""
    pipe = autoquant.load_pipeline("tiny-flux", dtype="auto")
    settings = EvalSettings.for_model("tiny-flux", "search", seeds=[0], batch_size=8)
    cfg = SearchConfig(model="tiny-flux", budget=budget, space=space or SearchSpace.from_dict(SPACE),
                       trials=trials, out=tmp_path / "out", resume=resume, settings=settings,
                       clip=None, progress=False, sensitivity=sensitivity)
    search = Search(cfg, pipe)
    if prepare:
        search.prepare()
    return search


def test_parse_budget():
    assert parse_budget("6GB") == ("bytes", 6e9)
    assert parse_budget("5.5GiB") == ("bytes", 5.5 * 2**30)
    assert parse_budget("35%") == ("share", 0.35)
    assert parse_budget("4.25bpw") == ("bpw", 4.25)
    assert parse_budget("123456") == ("bytes", 123456)
    for bad in ("six GB", "0%", "120%", "4bits", "0bpw", "40bpw", "0GB"):
        with pytest.raises(AutoquantError):
            parse_budget(bad)


def test_every_shipped_space_loads_and_bad_spaces_are_refused():
    for name in ("default", "hqq-only", "low-bit", "flux", "sd3", "sdxl"):
        space = load_space(name)
        assert space.candidates and space.fp_cap <= 0.20
    assert load_space("low-bit").max_bits_per_weight == 3.5
    bad = dict(SPACE, fp_cap=0.3, extra=1, candidates=[{"method": "hqq", "bits": 5}], tie=["re:("])
    with pytest.raises(SpaceError) as info:
        SearchSpace.from_dict(bad)
    text = str(info.value)
    for part in ("fp_cap=0.3 is above 0.2", "unknown key(s) ['extra']", "candidates[0]",
                 "bad regex"):
        assert part in text
    assert SearchSpace.from_dict(dict(SPACE, fp_cap=0.3), allow_fp_cap_above_default=True).fp_cap == 0.3


def test_a_budget_no_plan_meets_is_refused_with_the_smallest_size(tmp_path):
    with pytest.raises(AutoquantError, match=r"below the smallest plan this space allows: .* bpw"):
        make_search(tmp_path, budget="1%")


def test_search_writes_pareto_recipes_best_and_report(tmp_path):
    search = make_search(tmp_path, trials=8)
    tied = [g for g in search.groups.groups if g.name.startswith("tie:")]
    assert tied and all(len(g.layers) == 3 for g in tied)
    report = run_search(search)
    out = tmp_path / "out"
    assert (out / "study.db").is_file() and (out / "report.json").is_file()
    assert report["trials"]["complete"] + report["trials"]["pruned"] == 8
    best = autoquant.load_recipe(out / "best.yaml")
    pipe = autoquant.load_pipeline("tiny-flux", dtype="auto")  # as searched
    inv = autoquant.inventory(pipe)
    plan = best.resolve(inv)  # the exported recipe applies to the model
    assert best.metrics["bytes"] <= search.budget_bytes
    summary = autoquant.apply_recipe(pipe, best, progress=False)
    assert summary.fp_share <= 0.20 + 1e-9
    # the byte formulas agree with the measured bytes of the applied plan
    assert summary.bytes_after + search.other_bytes == best.metrics["bytes"]
    # tied layers got one config
    for g in tied:
        assert len({plan.configs[l.name] for l in g.layers}) == 1
    pareto = sorted((out / "pareto").glob("*.yaml"))
    assert pareto and all(autoquant.load_recipe(p).provenance["study"] for p in pareto)
    # every uniform baseline that fits was tried, so the front is never worse than them
    sources = {t.user_attrs["source"] for t in optuna.load_study(
        study_name=report["study"], storage=f"sqlite:///{out / 'study.db'}").trials}
    assert any(s.startswith("solver@") for s in sources)
    assert "uniform hqq4-g32" in sources or search.constraints(
        [g.options.index(search.cfg.space.candidates[1]) for g in search.groups.groups])[0] > 0


def test_rerunning_continues_the_study_without_repeating_finished_trials(tmp_path):
    run_search(make_search(tmp_path, trials=4))
    # the same settings: the study goes on (no flag needed), sensitivity reused from the study
    again = make_search(tmp_path, trials=6)
    report = run_search(again)
    assert report["trials"]["complete"] + report["trials"]["pruned"] == 6
    assert again.timing["sensitivity_reused"]
    report = run_search(make_search(tmp_path, trials=7, resume=True))
    assert report["trials"]["complete"] + report["trials"]["pruned"] == 7
    # other settings: refused before any image, naming the difference
    with pytest.raises(AutoquantError, match=r"(?s)cannot join it.*budget: this worker 35%"):
        run_search(_with_study(make_search(tmp_path, budget="35%"), report["study"]))
    with pytest.raises(AutoquantError, match="--resume: there is no study 'other'"):
        run_search(_with_study(make_search(tmp_path, resume=True), "other"))
    study = optuna.load_study(study_name=report["study"],
                              storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    keys = [tuple(sorted(t.params.items())) for t in study.trials if t.state.is_finished()]
    assert len(keys) == len(set(keys))


def _with_study(search, name):
    search.cfg = dataclasses.replace(search.cfg, study=name)
    return search


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path, monkeypatch):
    search = make_search(tmp_path, trials=4, prepare=True)
    real = search.evaluator.score
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(search.evaluator, "score", flaky)
    report = run_search(search)
    assert report["trials"]["fail"] == 1
    assert "out of memory" in report["failed"][0]["reason"]
    assert report["trials"]["complete"] + report["trials"]["pruned"] == 3


def test_cli_search_json(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    code = main(["search", "--model", "tiny-flux", "--budget", "45%", "--space", str(space),
                 "--sensitivity", "anchored",
                 "--trials", "3", "--seeds", "0", "--no-clip", "--out", str(tmp_path / "o"),
                 "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["best"]["bytes"] <= report["budget_bytes"]
    assert main(["search", "--model", "tiny-flux", "--budget", "lots", "--no-clip"]) == 2


def test_retarget_reuses_the_sensitivity_for_another_budget(tmp_path):
    search = make_search(tmp_path, budget="45%", trials=3, prepare=True)
    table = search.error
    first = run_search(search)
    search.retarget("35%", tmp_path / "second")
    assert search.error is table
    second = run_search(search)
    assert second["budget_bytes"] < first["budget_bytes"]
    assert second["best"]["bytes"] <= second["budget_bytes"]
    with pytest.raises(AutoquantError, match="below the smallest plan"):
        search.retarget("1%", tmp_path / "third")


def test_a_capped_layer_cache_evicts_but_never_changes_what_a_plan_computes(tmp_path):
    from autoquant.search._cache import LayerCache
    from autoquant.search._sensitivity import measure

    search = make_search(tmp_path, trials=1, prepare=True, sensitivity="full")
    unlimited = search.cache
    assert unlimited.evictions == 0 and unlimited.builds > 0
    layers = [l for l in search.inv if l.component == "transformer"]
    biggest = max(l.nbytes(search.groups.groups[0].options[0]) for l in layers)
    capped = LayerCache(search.pipe, search.inv, search.device, max_bytes=3 * biggest)
    # the sensitivity pass under a cap of three layers: same table, bounded cache
    rows = measure("full", search.replay, capped, search.groups, progress=False)
    assert [rows[i] for i in range(len(rows))] == search.error
    assert capped.evictions > 0 and capped.nbytes <= 3 * biggest
    # a whole plan is larger than the cap: it is still assembled (installed layers stay), and
    # its output equals the unlimited cache's
    plan = search.groups.plan(search.seeds()[0][1])
    capped.assemble(plan)
    assert capped.nbytes > 3 * biggest
    out_capped = search.replay.outputs()
    capped.restore()
    unlimited.assemble(plan)
    out_unlimited = search.replay.outputs()
    unlimited.restore()
    assert all(a.equal(b) for a, b in zip(out_capped, out_unlimited))
    # a later, different plan evicts what the first one no longer uses
    before = capped.evictions
    capped.assemble(search.groups.plan(search.seeds()[-1][1]))
    capped.restore()
    assert capped.evictions > before
    with pytest.raises(AutoquantError, match="positive size"):
        dataclasses.replace(search.cfg, cache_bytes=0)


def test_anchored_sensitivity_matches_the_full_table_at_each_anchor_and_in_order(tmp_path):
    from scipy.stats import spearmanr

    from autoquant.search._sensitivity import measure

    search = make_search(tmp_path, trials=1, prepare=True, sensitivity="auto")
    assert search.sensitivity_mode == "full"  # auto: a tiny model is measured in full
    full = search.error
    rows = measure("anchored", search.replay, search.cache, search.groups, progress=False)
    anchored = [rows[i] for i in range(len(rows))]
    assert len(anchored) == len(full)
    pairs = []
    for g, a, f in zip(search.groups.groups, anchored, full):
        quantized = [k for k, c in enumerate(g.options) if c.method != "none"]
        assert all(a[k] == 0.0 for k in range(len(g.options)) if k not in quantized)
        # the anchor (median local error) is replayed: its value is the full table's
        assert any(a[k] == pytest.approx(f[k], rel=1e-6) for k in quantized)
        pairs += [(a[k], f[k]) for k in quantized]
    rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    assert rho > 0.8, rho
    with pytest.raises(AutoquantError, match="sensitivity 'fast'"):
        dataclasses.replace(search.cfg, sensitivity="fast")
    forced = Search(dataclasses.replace(search.cfg, sensitivity="anchored"), search.pipe)
    forced.prepare()
    assert forced.sensitivity_mode == "anchored" and forced.timing["sensitivity_mode"] == "anchored"
    assert [v for r in forced.error for v in r] == pytest.approx([v for r in anchored for v in r])


def test_a_bug_inside_a_trial_stops_the_search_and_leaves_no_running_trial(tmp_path,
                                                                          monkeypatch):
    search = make_search(tmp_path, trials=4, prepare=True)

    def broken(*a, **k):
        raise TypeError("a programming error")

    monkeypatch.setattr(search.evaluator, "score", broken)
    with pytest.raises(TypeError, match="a programming error"):
        run_search(search)
    study = optuna.load_study(study_name="autoquant-tiny-flux-40%",
                              storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert "RUNNING" not in states and states.count("FAIL") == 1
    failed = next(t for t in study.trials if t.state.name == "FAIL")
    assert failed.user_attrs["fail_reason"].startswith("error: TypeError")


def test_seed_plans_survive_an_interruption(tmp_path):
    import threading

    search = make_search(tmp_path, trials=10, prepare=True)
    stop = threading.Event()
    real = search.evaluator.score
    calls = {"n": 0}

    def score_then_stop(*a, **k):
        calls["n"] += 1
        stop.set()  # as Ctrl-C would, during the first trial
        return real(*a, **k)

    search.evaluator.score = score_then_stop
    first = run_search(search, stop)
    assert first["interrupted"] and first["trials"]["finished"] == 1
    queued = first["trials"]["waiting"]
    assert queued >= 3  # the other seed plans are still queued in the storage
    again = run_search(make_search(tmp_path, trials=10))
    sources = [t["source"] for t in again["trials_detail"] if t["state"] != "WAITING"]
    assert sum(s.startswith(("solver@", "uniform")) for s in sources) == queued + 1


def test_sigterm_ends_the_search_cleanly_with_outputs(tmp_path):
    """A killed (SIGTERM) search ends its current trial and writes best.yaml and report.json;
    running the command again continues the study."""
    import os
    import signal
    import subprocess
    import sys
    import time

    argv = [sys.executable, "-m", "autoquant", "search", "--model", "tiny-flux", "--dtype",
            "auto", "--budget", "45%", "--trials", "40", "--seeds", "0", "--no-clip",
            "--space", "hqq-only", "--sensitivity", "anchored", "--out", str(tmp_path), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    study = "autoquant-tiny-flux-45%"
    deadline = time.time() + 120
    while time.time() < deadline:
        if (tmp_path / "study.db").is_file():
            try:
                s = optuna.load_study(study_name=study, storage=f"sqlite:///{tmp_path / 'study.db'}")
                if any(t.state.name == "COMPLETE" for t in s.trials):
                    break
            except KeyError:  # the study is not there yet
                pass
            except Exception as e:  # noqa: BLE001
                # the search may be creating the schema right now: this poll's own schema
                # check then collides with it (sqlite: UNIQUE alembic_version); poll again
                if "alembic_version" not in str(e) and "locked" not in str(e):
                    raise
        time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM: stopping after the current trial" in err
    report = json.loads(out)
    assert report["interrupted"] and 1 <= report["trials"]["finished"] < 40
    assert (tmp_path / "best.yaml").is_file()
    s = optuna.load_study(study_name=study, storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert not [t for t in s.trials if t.state.name == "RUNNING"]


def test_seeds_hold_each_uniform_config_with_the_usual_layers_kept(tmp_path):
    """'uniform + protect' -- what people deploy -- is among the first trials wherever it fits,
    so the front is never worse than it."""
    from autoquant.scoring.baseline import protected_layers

    search = make_search(tmp_path, budget="60%", prepare=True)
    seeds = dict(search.seeds())
    assert "uniform hqq4-g32" in seeds and "uniform hqq4-g32 + protect" in seeds
    plan = search.groups.plan(seeds["uniform hqq4-g32 + protect"])
    kept = set(protected_layers(search.inv, ["transformer"]))
    assert kept and all(plan[n].full_precision for n in kept if n in plan)
    assert {c.label for n, c in plan.items() if n not in kept} == {"hqq4-g32"}
    assert max(search.constraints(seeds["uniform hqq4-g32 + protect"])) <= 0


def test_images_sensitivity_is_each_images_error_with_one_group_changed(tmp_path):
    """``--sensitivity images``: per (group, config), the search images' own errors -- entry by
    entry what generating with that group alone quantized gives; stored in the study, so a
    rerun plans from it without generating it again."""
    import math

    by_block = SearchSpace.from_dict({  # one group per block: few generations
        **SPACE, "candidates": SPACE["candidates"][:2] + SPACE["candidates"][3:],
        "tie": ["re:(transformer\\.(?:single_)?transformer_blocks\\.\\d+)\\..*"]})

    def images_search(trials, resume=False):  # 4 images of 3 steps: a generation per entry
        s = make_search(tmp_path, trials=trials, resume=resume, sensitivity="images",
                        space=by_block)
        settings = dataclasses.replace(s.settings, prompts=s.settings.prompts[:4], steps=3)
        return Search(dataclasses.replace(s.cfg, settings=settings), s.pipe)

    search = images_search(3)
    search.prepare()
    assert search.sensitivity_mode == "images"
    n = len(search.evaluator.pairs)
    g = max(range(len(search.groups.groups)), key=lambda i: len(search.groups.groups[i].layers))
    group = search.groups.groups[g]
    for k, cfg in enumerate(group.options):
        row = search.error[g][k]
        assert len(row) == n
        if cfg.full_precision:
            assert row == [0.0] * n
            continue
        search.cache.assemble({l.name: cfg for l in group.layers})
        images = search.evaluator.images()
        search.cache.restore()
        refs = search.evaluator.references
        assert row == pytest.approx((images.float() - refs.float()).pow(2).flatten(1).mean(1)
                                    .tolist(), rel=1e-6, abs=1e-12)
    two_bit = group.options.index(next(c for c in group.options if getattr(c, "bits", 0) == 2))
    assert sum(search.error[g][two_bit]) > 0
    # the plan the solver proposes meets the budget; the proxy is the predicted dB lost
    seeds = search.seeds()
    assert seeds[0][0] == "solver@100%" and max(search.constraints(seeds[0][1])) <= 0
    lost = [search.proxy(c) for _, c in seeds]
    assert all(math.isfinite(v) and v >= 0 for v in lost)
    assert search.proxy(seeds[0][1]) <= min(search.proxy(c) for s, c in seeds
                                            if s.startswith("uniform")) + 1e-9
    run_search(search)
    again = images_search(4, resume=True)
    run_search(again)
    assert again.timing["sensitivity_reused"] and again.error == search.error
