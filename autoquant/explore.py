"""Look at a finished (or running) study: the Pareto front, the images, where the bits went.

Used by ``notebooks/pareto_explorer.ipynb`` and ``autoquant report``. Everything is read back from
the Optuna study (and its artifact store) -- the model is not needed::

    view = autoquant.explore.open_study("autoquant-search")          # an --out folder
    view = autoquant.explore.open_study(storage="postgresql://...", study="NAME", artifacts="DIR")
    front_figure(view).show(); bitmap_figure(view, view.best).show()

A study is untrusted data: images are read only through Optuna's artifact store and only for
artifact ids the study itself recorded, and every string from it is escaped in the HTML report.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import re
import warnings
from pathlib import Path
from typing import Any

with warnings.catch_warnings():  # optuna imports tqdm.auto, which warns in notebooks that lack
    warnings.filterwarnings("ignore", message="IProgress not found")  # ipywidgets
    import optuna

from . import _atomic
from ._errors import InputError
from ._format import human_bytes
from .search._outputs import (IDENTITY, checked_identity, fail_reason, plan_recipe,
                              quality_objectives, tally, trial_metrics)

_LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "clip_fidelity": "CLIP fidelity"}


@dataclasses.dataclass
class Trial:
    number: int
    state: str
    source: str
    bytes: float | None
    metrics: dict[str, float]
    params: dict[str, str]
    images_artifact: str | None
    pareto: bool = False
    reason: str | None = None
    worker: dict | None = None

    @property
    def psnr(self) -> float | None:
        return self.metrics.get("psnr")

    @property
    def clip_fidelity(self) -> float | None:
        return self.metrics.get("clip_fidelity")


@dataclasses.dataclass
class StudyView:
    study: Any
    info: dict
    trials: list[Trial]
    store: Any  # an Optuna artifact store, or None
    artifact_ids: set[str]

    @property
    def budget(self) -> float:
        return self.info["budget_bytes"]

    @property
    def objectives(self) -> list[str]:
        return quality_objectives(self.info)

    @property
    def complete(self) -> list[Trial]:
        return [t for t in self.trials if t.state == "COMPLETE"]

    @property
    def pareto(self) -> list[Trial]:
        return sorted((t for t in self.trials if t.pareto), key=lambda t: t.bytes)

    @property
    def baselines(self) -> list[Trial]:
        return [t for t in self.complete if t.source.startswith("uniform")]

    @property
    def best(self) -> Trial | None:
        ok = [t for t in self.complete if t.bytes <= self.budget]
        return max(ok, key=lambda t: [t.metrics[o] for o in self.objectives], default=None)

    def bits(self, label: str) -> float:
        """Nominal bits of a config label of this study (16 for full precision)."""
        return float(self.info["bits"].get(label, float("nan")))

    def trial(self, number: int) -> Trial:
        for t in self.trials:
            if t.number == number:
                return t
        raise InputError(f"no trial {number} in this study")

    def layer_configs(self, trial: Trial) -> dict[str, str]:
        from .backends import full_precision

        fp = full_precision().label
        out = {name: fp for name in self.info.get("fixed", [])}
        for group, layers in self.info["groups"].items():
            for layer in layers:
                out[layer] = trial.params.get(group, fp)
        return out

    def table(self) -> list[dict]:
        return [{"trial": t.number, "state": t.state, "source": t.source,
                 "bytes": t.bytes, "MiB": None if t.bytes is None else t.bytes / 2**20,
                 "of_fp": None if t.bytes is None else t.bytes / self.info["fp_bytes"],
                 **{o: t.metrics.get(o) for o in self.objectives}, "pareto": t.pareto,
                 "in_budget": t.bytes is not None and t.bytes <= self.budget,
                 "reason": t.reason or ""}
                for t in self.trials]


def _number(value) -> float | None:
    """A trial attribute read as a number: anything else (a hand-edited database) is None."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _text(value) -> str | None:
    return value if isinstance(value, str) else None


def open_study(out: str | Path | None = None, storage: str | None = None,
               study: str | None = None, artifacts: str | Path | None = None) -> StudyView:
    """A search from its ``--out`` folder, or a storage URL + study name (+ artifact folder or
    bucket; default: OUT/artifacts, or the bucket the study records)."""
    given_artifacts = artifacts
    if out is not None:
        out = Path(out)
        if not (out / "study.db").is_file() and storage is None:
            raise InputError(f"{out} holds no study.db: pass the --out folder of a search, or "
                             f"--storage URL --study NAME")
        storage = storage or f"sqlite:///{(out / 'study.db').resolve()}"
        artifacts = artifacts or out / "artifacts"
    if storage is None:
        raise InputError("pass an --out folder, or a storage URL and a study name")
    from .search._study import open_storage

    rdb = open_storage(storage, Path(out or "."))
    # "NAME:setup" studies hold a search's shared setup work, not plans
    names = [n for n in optuna.get_all_study_names(rdb) if not n.endswith(":setup")]
    if study is None:
        if len(names) != 1:
            raise InputError(f"the storage holds studies {names}: pass --study NAME")
        study = names[0]
    if study not in names:
        raise InputError(f"no study {study!r} in the storage; it holds {names}")
    s = optuna.load_study(study_name=study, storage=rdb)
    info = checked_identity(s)
    frozen = s.get_trials(deepcopy=False)
    complete = [t for t in frozen if t.state == optuna.trial.TrialState.COMPLETE]
    pareto = {t.number for t in s.best_trials} if complete else set()
    retried = tally(s)["retried"]
    trials = []
    for t in frozen:
        done = t.state == optuna.trial.TrialState.COMPLETE
        metrics = {k: v for k, v in trial_metrics(info, t).items() if k != "bytes"} if done else {}
        trials.append(Trial(
            number=t.number, state=t.state.name, source=str(t.user_attrs.get("source", "")),
            bytes=t.values[0] if done else _number(t.user_attrs.get("predicted_bytes")),
            metrics=metrics, params=dict(t.params),
            images_artifact=_text(t.user_attrs.get("images_artifact")),
            pareto=t.number in pareto,
            reason=(fail_reason(t, retried) if t.state == optuna.trial.TrialState.FAIL
                    else t.user_attrs.get("pruned_at")),
            worker=_text(t.user_attrs.get("worker"))))
    store, ids = None, set()
    from .search import _artifacts

    study_location = _artifacts.recorded(s)
    if given_artifacts is None and study_location is not None and \
            _artifacts.is_remote(study_location["location"]):
        # the study's bucket; a folder the study names is never opened unasked (the database
        # may come from anyone): a folder is the one passed, or OUT/artifacts
        artifacts = study_location["location"]
    location = None if artifacts is None else _artifacts.normalize(artifacts, Path("."))
    if location is not None and (_artifacts.is_remote(location) or Path(location).is_dir()):
        store = _artifacts.open_store(location, create=False)
        from optuna.artifacts import get_all_artifact_meta

        ids = {m.artifact_id for m in get_all_artifact_meta(s, storage=rdb)}
        for t in frozen:
            ids |= {m.artifact_id for m in get_all_artifact_meta(t, storage=rdb)}
    return StudyView(s, info, trials, store, ids)


def images_png(view: StudyView, trial: Trial | None) -> bytes | None:
    """PNG bytes of a trial's candidate grid (None: the full-precision references), read through
    the artifact store; an id the study did not record, or one the store refuses, gives None."""
    artifact = view.study.user_attrs.get("reference_artifact") if trial is None \
        else trial.images_artifact
    if view.store is None or not isinstance(artifact, str) or artifact not in view.artifact_ids:
        return None
    try:
        with view.store.open_reader(artifact) as f:
            data = f.read(16 * 2**20 + 1)
    except (ValueError, OSError, optuna.artifacts.exceptions.ArtifactNotFound):
        return None
    return data if data.startswith(b"\x89PNG") and len(data) <= 16 * 2**20 else None


def front_figure(view: StudyView):
    """Bytes vs each quality objective: all trials, the Pareto front, baselines, the budget.
    With step time searched: trials coloured by their step time, and one more panel, the first
    quality objective vs step time."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    objectives = view.objectives
    timed = "latency" in view.info["objectives"]
    titles = [f"{_LABELS.get(o, o)} vs bytes" for o in objectives]
    if timed:
        titles.append(f"{_LABELS.get(objectives[0], objectives[0])} vs step time")
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles)
    done, front, base = view.complete, view.pareto, view.baselines
    text = lambda ts: [html.escape(f"trial {t.number} ({t.source})") for t in ts]  # noqa: E731
    ms = lambda ts: [t.metrics["latency"] * 1e3 for t in ts]  # noqa: E731
    for col, key in enumerate(objectives, start=1):
        mib = lambda ts: [t.bytes / 2**20 for t in ts]  # noqa: E731
        val = lambda ts: [t.metrics[key] for t in ts]  # noqa: E731
        marker = (dict(color=ms(done), colorscale="Viridis", size=8, showscale=col == 1,
                       colorbar=dict(title="step ms", x=-0.12)) if timed
                  else dict(color="#9aa5b1", size=7))
        fig.add_trace(go.Scatter(x=mib(done), y=val(done), mode="markers", name="trials",
                                 text=text(done), marker=marker,
                                 showlegend=col == 1), row=1, col=col)
        fig.add_trace(go.Scatter(x=mib(front), y=val(front), mode="lines+markers", name="Pareto",
                                 text=text(front), marker=dict(color="#d62728", size=9),
                                 showlegend=col == 1), row=1, col=col)
        fig.add_trace(go.Scatter(x=mib(base), y=val(base), mode="markers+text",
                                 name="uniform baselines",
                                 text=[html.escape(t.source[8:]) for t in base],
                                 textposition="top center", marker=dict(symbol="x", size=11,
                                                                         color="#1f77b4"),
                                 showlegend=col == 1), row=1, col=col)
        fig.add_vline(x=view.budget / 2**20, line_dash="dash", line_color="black",
                      annotation_text="budget", row=1, col=col)
        fig.update_xaxes(title_text="bytes of the searched components (MiB)", row=1, col=col)
        fig.update_yaxes(title_text=_LABELS.get(key, key), row=1, col=col)
    if timed:
        col, key = len(titles), objectives[0]
        fig.add_trace(go.Scatter(x=ms(done), y=[t.metrics[key] for t in done], mode="markers",
                                 name="trials (step time)", text=text(done),
                                 marker=dict(color="#9aa5b1", size=7)), row=1, col=col)
        fig.add_trace(go.Scatter(x=ms(front), y=[t.metrics[key] for t in front],
                                 mode="markers", name="Pareto (step time)", text=text(front),
                                 marker=dict(color="#d62728", size=9)), row=1, col=col)
        fig.update_xaxes(title_text="predicted step (ms)", row=1, col=col)
        fig.update_yaxes(title_text=_LABELS.get(key, key), row=1, col=col)
    fig.update_layout(height=430, margin=dict(t=40, b=40), template="plotly_white")
    return fig


def _block_layout(names: list[str]) -> tuple[list[str], list[str], dict]:
    """Rows = blocks (``...blocks.N``), columns = the layer's path inside its block."""
    rows, cols, cell = [], [], {}
    for name in names:
        m = re.match(r"(.*?\.\d+)\.(.*)", name)
        row, col = (m.group(1), m.group(2)) if m else ("(other)", name)
        if row not in rows:
            rows.append(row)
        if col not in cols:
            cols.append(col)
        cell[name] = (rows.index(row), cols.index(col))
    return rows, cols, cell


def bitmap_figure(view: StudyView, trial: Trial):
    """Where the bits went: one cell per layer (rows: blocks), colour = bits, hover = config."""
    import plotly.graph_objects as go

    configs = view.layer_configs(trial)
    rows, cols, cell = _block_layout(sorted(configs, key=_natural))
    z = [[None] * len(cols) for _ in rows]
    text = [[""] * len(cols) for _ in rows]
    for name, label in configs.items():
        r, c = cell[name]
        z[r][c] = view.bits(label)
        text[r][c] = html.escape(f"{name}") + "<br>" + html.escape(label)
    fig = go.Figure(go.Heatmap(z=z, x=[html.escape(c) for c in cols],
                               y=[html.escape(r) for r in rows], text=text, hoverinfo="text",
                               colorscale="Viridis", zmin=2, zmax=16,
                               colorbar=dict(title="bits")))
    fig.update_layout(height=max(300, 22 * len(rows) + 160), template="plotly_white",
                      title=f"trial {trial.number}: bits per layer", margin=dict(t=50, b=120),
                      yaxis=dict(autorange="reversed", type="category", dtick=1),
                      xaxis=dict(type="category", dtick=1))
    return fig


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def export_recipe(view: StudyView, trial: Trial, path: str | Path) -> Path:
    """Write a trial's plan as a recipe -- the same builder, fingerprint and provenance as the
    search's ``pareto/`` recipes."""
    metrics = None
    if trial.state == "COMPLETE":
        metrics = {"bytes": int(trial.bytes), **trial.metrics,
                   "within_budget": trial.bytes <= view.budget}
    recipe = plan_recipe(view.info, trial.params, metrics, trial.number, view.study.study_name)
    return recipe.save(path)


def _cell(value: Any, spec: str = "") -> str:
    if value is None:
        return ""
    return html.escape(format(value, spec) if spec else str(value))


def write_report(view: StudyView, path: str | Path) -> Path:
    """A self-contained HTML report (plotly.js inlined, images embedded): opens with no network.
    Every string that comes from the study is escaped."""
    import plotly.io as pio

    path = Path(path)
    best = view.best
    info = view.info
    e = html.escape
    parts = [f"<h1>autoquant search: {e(str(info['model']))}</h1>",
             f"<p>study <code>{e(view.study.study_name)}</code>, space "
             f"<code>{e(str(info['space_name']))}</code>, budget {e(str(info['budget']))} = "
             f"{human_bytes(view.budget)} of {human_bytes(info['fp_bytes'])} (components: "
             f"{e(', '.join(map(str, info['components'])))}); {len(view.trials)} trials, "
             f"{len(view.complete)} complete, {len(view.pareto)} on the Pareto front.</p>",
             pio.to_html(front_figure(view), include_plotlyjs=True, full_html=False)]
    if best is not None:
        scores = ", ".join(f"{_LABELS.get(o, o)} {best.metrics[o]:.4g}" for o in view.objectives)
        parts.append(f"<h2>Best within the budget: trial {best.number}</h2><p>"
                     f"{human_bytes(best.bytes)}, {e(scores)} ({e(best.source)})</p>")
        parts.append(pio.to_html(bitmap_figure(view, best), include_plotlyjs=False,
                                 full_html=False))
    prompts = [str(p) for p in info.get("prompts", [])][:8]
    parts.append("<h2>Images: full precision, then each Pareto trial</h2><p>Prompts, left to "
                 "right: " + "; ".join(f"{i + 1}. {e(p)}" for i, p in enumerate(prompts)) + "</p>")
    for label, trial in [("full precision", None)] + [
            (f"trial {t.number}: {human_bytes(t.bytes)}, "
             + ", ".join(f"{_LABELS.get(o, o)} {t.metrics[o]:.4g}" for o in view.objectives), t)
            for t in view.pareto]:
        png = images_png(view, trial)
        if png:
            b64 = base64.b64encode(png).decode()
            parts.append(f"<figure><img src='data:image/png;base64,{b64}' "
                         f"style='image-rendering:pixelated;height:96px'><figcaption>{e(label)}"
                         f"</figcaption></figure>")
    heads = "".join(f"<th>{e(_LABELS.get(o, o))}</th>" for o in view.objectives)
    rows = "".join(
        f"<tr><td>{r['trial']}</td><td>{_cell(r['state'])}</td><td>{_cell(r['source'])}</td>"
        f"<td>{'' if r['bytes'] is None else human_bytes(r['bytes'])}</td>"
        + "".join(f"<td>{_cell(r[o], '.4g')}</td>" for o in view.objectives)
        + f"<td>{'yes' if r['pareto'] else ''}</td><td class='reason'>{_cell(r['reason'])}</td>"
          f"</tr>" for r in view.table())
    parts.append(f"<h2>Trials</h2><table><tr><th>trial</th><th>state</th><th>source</th>"
                 f"<th>bytes</th>{heads}<th>Pareto</th><th>reason</th></tr>{rows}</table>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}td.reason{text-align:left}figure{display:inline-block;margin:6px}")
    _atomic.write_text(path, f"<!doctype html><html><head><meta charset='utf-8'><title>autoquant report"
                    f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
    return path
