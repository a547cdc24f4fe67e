"""Look at a finished study: the Pareto front, the images, where the bits went.

Used by ``notebooks/pareto_explorer.ipynb`` and ``autoquant report``. Everything is read back from
the Optuna study (and its artifact folder) -- the model is not needed::

    view = autoquant.explore.open_study("autoquant-search")          # an --out folder
    view = autoquant.explore.open_study(storage="postgresql://...", study="NAME", artifacts="DIR")
    front_figure(view).show(); bitmap_figure(view, view.best).show()
"""

from __future__ import annotations

import base64
import dataclasses
import re
from pathlib import Path
from typing import Any

import optuna

from ._errors import AutoquantError
from ._format import human_bytes

# bits of each config label (for the bit map); full precision counts as 16
_BITS = re.compile(r"^(?:hqq|bnb|higgs)(\d+)|^torchao-intx(\d+)|^torchao-int(4)")


def config_bits(label: str) -> float:
    if label == "none":
        return 16.0
    if label.startswith("torchao-") and ("int8" in label or "fp8" in label):
        return 8.0
    m = _BITS.match(label)
    return float(next(g for g in m.groups() if g)) if m else float("nan")


@dataclasses.dataclass
class Trial:
    number: int
    state: str
    source: str
    bytes: float | None
    psnr: float | None
    clip_fidelity: float | None
    params: dict[str, str]
    images_artifact: str | None
    pareto: bool = False

    @property
    def within(self) -> bool:
        return self.bytes is not None


@dataclasses.dataclass
class StudyView:
    study: Any
    info: dict
    trials: list[Trial]
    artifacts: Path | None

    @property
    def budget(self) -> float:
        return self.info["budget_bytes"]

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
        return max(ok, key=lambda t: (t.psnr, t.clip_fidelity), default=None)

    def trial(self, number: int) -> Trial:
        for t in self.trials:
            if t.number == number:
                return t
        raise AutoquantError(f"no trial {number} in this study")

    def layer_configs(self, trial: Trial) -> dict[str, str]:
        out = {name: "none" for name in self.info.get("fixed", [])}
        for group, layers in self.info["groups"].items():
            for layer in layers:
                out[layer] = trial.params.get(group, "none")
        return out

    def table(self) -> list[dict]:
        return [{"trial": t.number, "state": t.state, "source": t.source,
                 "bytes": t.bytes, "MiB": None if t.bytes is None else t.bytes / 2**20,
                 "of_fp": None if t.bytes is None else t.bytes / self.info["fp_bytes"],
                 "psnr": t.psnr, "clip_fidelity": t.clip_fidelity, "pareto": t.pareto,
                 "in_budget": t.bytes is not None and t.bytes <= self.budget}
                for t in self.trials]


def open_study(out: str | Path | None = None, storage: str | None = None,
               study: str | None = None, artifacts: str | Path | None = None) -> StudyView:
    """A finished (or running) search, from its ``--out`` folder or a storage URL + study name."""
    if out is not None:
        out = Path(out)
        if not (out / "study.db").is_file() and storage is None:
            raise AutoquantError(f"{out} holds no study.db: pass the --out folder of a search, or "
                                 f"--storage URL --study NAME")
        storage = storage or f"sqlite:///{(out / 'study.db').resolve()}"
        artifacts = artifacts or out / "artifacts"
    if storage is None:
        raise AutoquantError("pass an --out folder, or a storage URL and a study name")
    names = optuna.get_all_study_names(storage)
    if study is None:
        if len(names) != 1:
            raise AutoquantError(f"{storage} holds studies {names}: pass --study NAME")
        study = names[0]
    if study not in names:
        raise AutoquantError(f"no study {study!r} in {storage}; it holds {names}")
    s = optuna.load_study(study_name=study, storage=storage)
    info = s.user_attrs.get("autoquant")
    if not info:
        raise AutoquantError(f"study {study!r} was not made by autoquant search")
    pareto = {t.number for t in s.best_trials} if any(
        t.state == optuna.trial.TrialState.COMPLETE for t in s.trials) else set()
    trials = []
    for t in s.trials:
        done = t.state == optuna.trial.TrialState.COMPLETE
        trials.append(Trial(
            number=t.number, state=t.state.name, source=t.user_attrs.get("source", ""),
            bytes=t.values[0] if done else t.user_attrs.get("predicted_bytes"),
            psnr=t.values[1] if done else None, clip_fidelity=t.values[2] if done else None,
            params=dict(t.params), images_artifact=t.user_attrs.get("images_artifact"),
            pareto=t.number in pareto))
    return StudyView(s, info, trials, Path(artifacts) if artifacts else None)


def _artifact_path(view: StudyView, artifact_id: str | None) -> Path | None:
    if not artifact_id or view.artifacts is None:
        return None
    path = view.artifacts / artifact_id
    return path if path.is_file() else None


def images_png(view: StudyView, trial: Trial | None) -> bytes | None:
    """PNG bytes of a trial's candidate grid (None: the full-precision references)."""
    artifact = view.study.user_attrs.get("reference_artifact") if trial is None \
        else trial.images_artifact
    path = _artifact_path(view, artifact)
    return path.read_bytes() if path else None


def front_figure(view: StudyView):
    """Bytes vs PSNR and bytes vs CLIP fidelity: all trials, the Pareto front, baselines, budget."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("PSNR vs bytes", "CLIP fidelity vs bytes"))
    done, front, base = view.complete, view.pareto, view.baselines
    for col, key, label in ((1, "psnr", "PSNR (dB)"), (2, "clip_fidelity", "CLIP fidelity")):
        mib = lambda ts: [t.bytes / 2**20 for t in ts]  # noqa: E731
        val = lambda ts: [getattr(t, key) for t in ts]  # noqa: E731
        text = lambda ts: [f"trial {t.number} ({t.source})" for t in ts]  # noqa: E731
        fig.add_trace(go.Scatter(x=mib(done), y=val(done), mode="markers", name="trials",
                                 text=text(done), marker=dict(color="#9aa5b1", size=7),
                                 showlegend=col == 1), row=1, col=col)
        fig.add_trace(go.Scatter(x=mib(front), y=val(front), mode="lines+markers", name="Pareto",
                                 text=text(front), marker=dict(color="#d62728", size=9),
                                 showlegend=col == 1), row=1, col=col)
        fig.add_trace(go.Scatter(x=mib(base), y=val(base), mode="markers+text",
                                 name="uniform baselines", text=[t.source[8:] for t in base],
                                 textposition="top center", marker=dict(symbol="x", size=11,
                                                                         color="#1f77b4"),
                                 showlegend=col == 1), row=1, col=col)
        fig.add_vline(x=view.budget / 2**20, line_dash="dash", line_color="black",
                      annotation_text="budget", row=1, col=col)
        fig.update_xaxes(title_text="bytes of the searched components (MiB)", row=1, col=col)
        fig.update_yaxes(title_text=label, row=1, col=col)
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
        z[r][c] = config_bits(label)
        text[r][c] = f"{name}<br>{label}"
    fig = go.Figure(go.Heatmap(z=z, x=cols, y=rows, text=text, hoverinfo="text",
                               colorscale="Viridis", zmin=2, zmax=16,
                               colorbar=dict(title="bits")))
    fig.update_layout(height=max(300, 22 * len(rows) + 160), template="plotly_white",
                      title=f"trial {trial.number}: bits per layer", margin=dict(t=50, b=120),
                      yaxis=dict(autorange="reversed", type="category", dtick=1),
                      xaxis=dict(type="category", dtick=1))
    return fig


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def export_recipe(view: StudyView, trial: Trial, path: str | Path):
    """Write a trial's plan as a recipe (same form as the search's pareto/ recipes)."""
    from .backends import config_from_dict
    from .recipe import Recipe

    labels = {}
    for cfg_dict in _space_candidates(view):
        cfg = config_from_dict(cfg_dict)
        labels[cfg.label] = cfg
    labels["none"] = config_from_dict({"method": "none"})
    layers = {n: labels[l] for n, l in sorted(view.layer_configs(trial).items())}
    recipe = Recipe(layers=layers, components=view.info["components"],
                    model={"id": view.info["model"]},
                    metrics={"bytes": trial.bytes, "psnr": trial.psnr,
                             "clip_fidelity": trial.clip_fidelity},
                    provenance={"study": view.study.study_name, "trial": trial.number})
    return recipe.save(path)


def _space_candidates(view: StudyView) -> list[dict]:
    from .space import load_space

    try:
        return [c.to_dict() for c in load_space(view.info["space"]).candidates]
    except AutoquantError:
        raise AutoquantError(f"the study's space {view.info['space']!r} cannot be found to "
                             f"rebuild its configs; use the recipes in pareto/") from None


def write_report(view: StudyView, path: str | Path) -> Path:
    """A self-contained HTML report (plotly.js inlined, images embedded): opens with no network."""
    import plotly.io as pio

    path = Path(path)
    best = view.best
    parts = [f"<h1>autoquant search: {view.info['model']}</h1>",
             f"<p>study <code>{view.study.study_name}</code>, space <code>{view.info['space']}</code>, "
             f"budget {view.info['budget']} = {human_bytes(view.budget)} of "
             f"{human_bytes(view.info['fp_bytes'])} (components: "
             f"{', '.join(view.info['components'])}); {len(view.trials)} trials, "
             f"{len(view.complete)} complete, {len(view.pareto)} on the Pareto front.</p>",
             pio.to_html(front_figure(view), include_plotlyjs=True, full_html=False)]
    if best is not None:
        parts.append(f"<h2>Best within the budget: trial {best.number}</h2><p>"
                     f"{human_bytes(best.bytes)}, PSNR {best.psnr:.2f} dB, CLIP fidelity "
                     f"{best.clip_fidelity:.4f} ({best.source})</p>")
        parts.append(pio.to_html(bitmap_figure(view, best), include_plotlyjs=False,
                                 full_html=False))
    parts.append("<h2>Images: full precision, then each Pareto trial</h2>")
    for label, trial in [("full precision", None)] + [(f"trial {t.number}: "
                                                        f"{human_bytes(t.bytes)}, {t.psnr:.2f} dB",
                                                        t) for t in view.pareto]:
        png = images_png(view, trial)
        if png:
            b64 = base64.b64encode(png).decode()
            parts.append(f"<figure><img src='data:image/png;base64,{b64}' "
                         f"style='image-rendering:pixelated;height:96px'><figcaption>{label}"
                         f"</figcaption></figure>")
    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    rows = "".join(
        f"<tr><td>{r['trial']}</td><td>{r['state']}</td><td>{r['source']}</td>"
        f"<td>{'' if r['bytes'] is None else human_bytes(r['bytes'])}</td>"
        f"<td>{fmt(r['psnr'], '.2f')}</td><td>{fmt(r['clip_fidelity'], '.4f')}</td>"
        f"<td>{'yes' if r['pareto'] else ''}</td></tr>" for r in view.table())
    parts.append("<h2>Trials</h2><table><tr><th>trial</th><th>state</th><th>source</th>"
                 "<th>bytes</th><th>PSNR</th><th>CLIP fidelity</th><th>Pareto</th></tr>"
                 f"{rows}</table>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}figure{display:inline-block;margin:6px}")
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>autoquant report"
                    f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
    return path
