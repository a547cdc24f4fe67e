"""Judge a quantization plan by the images it makes, against cached full-precision references.

An :class:`Evaluator` holds one pipeline for its whole life: references are generated (or read
from the cache) once, the CLIP features of the references and prompts once; each
:meth:`Evaluator.evaluate` applies a recipe in place, generates, scores, and puts the
full-precision layers back -- the pipeline is never reloaded between candidates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import torch

from .._errors import InputError, NonFiniteError
from .._format import human_bytes, table
from ..backends.measure import measured_bytes
from ..generation.images import (_generate, batches,  # noqa: F401  (old import path)
                                 generate_images)
from ..generation.settings import EvalSettings
from ..models.inventory import DENOISERS, components_of, inventory
from ..plans.apply import apply_recipe, revert
from ..plans.recipe import Recipe
from .metrics import aggregate, clip_features, clip_metrics, pixel_metrics
from .references import ReferenceCache, model_key, render_key


def default_components(pipe: Any) -> list[str]:
    """The components a search and its byte counts cover by default: the denoiser."""
    comps = components_of(pipe)
    found = [c for c in DENOISERS if c in comps]
    return found[:1] or list(comps)


@dataclasses.dataclass
class EvalResult:
    label: str
    metrics: dict[str, dict[str, float]]
    per_image: list[dict[str, Any]]
    bytes: int
    pipeline_bytes: int
    fp_bytes: int
    bits_per_weight: float
    fp_share: float
    latency_s: float
    timing: dict[str, float]
    images: int
    components: list[str]
    summary: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name, agg in self.metrics.items():  # flat keys for machines: psnr, ssim, ...
            d[name] = agg["mean"]
            d[f"{name}_worst"] = agg["worst"]
        return d

    def row(self) -> list[str]:
        m = self.metrics
        get = lambda k, f: f.format(m[k]["mean"]) if k in m else "-"  # noqa: E731
        return [self.label, human_bytes(self.bytes), f"{self.bits_per_weight:.2f}",
                get("psnr", "{:.2f}"), f"{m['psnr']['worst']:.2f}", get("ssim", "{:.4f}"),
                get("clip_fidelity", "{:.4f}"), get("clip_score", "{:.2f}"),
                get("clip_score_delta", "{:+.2f}"), f"{self.latency_s:.3f}"]

    HEADER = ["plan", "bytes", "bits/w", "PSNR", "PSNR worst", "SSIM", "CLIP fid", "CLIP score",
              "d score", "s/image"]

    def table(self) -> str:
        t = self.timing
        return (table([self.row()], self.HEADER) +
                f"\n{self.images} images; components {', '.join(self.components)}: "
                f"{human_bytes(self.bytes)} of {human_bytes(self.fp_bytes)} in full precision; "
                f"pipeline {human_bytes(self.pipeline_bytes)}; full-precision share "
                f"{self.fp_share:.1%}\ntime: generation {t['generation_s']:.2f} s, metrics "
                f"{t['metrics_s']:.2f} s, apply {t['apply_s']:.2f} s, overhead "
                f"{t['overhead_s']:.2f} s, total {t['total_s']:.2f} s")


class Evaluator:
    def __init__(self, pipe: Any, settings: EvalSettings, clip: Any = None,
                 components: list[str] | None = None, cache: ReferenceCache | None = None,
                 progress: bool = True, key: str | None = None,
                 references: torch.Tensor | None = None, compile: bool = False,
                 memory: Any = None, segments: tuple[int, ...] = ()):
        """``clip``: a :class:`autoquant.scoring.clip.Clip`, or None for no CLIP metrics.
        ``key``: :func:`autoquant.scoring.references.model_key` of ``pipe``, if already known.
        ``references``: the full-precision images, when another worker of the same study made
        them (checked against the settings, then used instead of the cache).
        ``memory``: a placed :class:`autoquant.runtime.memory.MemoryPlan` (references are made with what
        does not fit streaming; a recipe is applied onto its GPU).
        ``segments``: indices where scoring is cut (:meth:`score` of ``range(k)``, then of the
        rest): references and candidates are made in the same batches, so full precision scores
        exactly against its own references, cut or not."""
        start = time.perf_counter()
        from .._errors import expect

        expect(settings, EvalSettings, "Evaluator(pipe, settings)",
               "an autoquant.EvalSettings (e.g. EvalSettings.for_model('demo'))")
        components_of(pipe)  # a pipeline or a module, or a clear error
        self.pipe, self.settings, self.clip, self.progress = pipe, settings, clip, progress
        self.compile = compile
        self.memory = memory
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)  # ours shows progress per batch
        self.components = components or default_components(pipe)
        missing = set(self.components) - set(components_of(pipe))
        if missing:
            raise InputError(f"no component(s) {sorted(missing)} in this pipeline; it has "
                             f"{sorted(components_of(pipe))}")
        self.inventory = inventory(pipe)
        self.cache = cache or ReferenceCache()
        self.render = render_key(pipe)
        self.model_key = key or model_key(pipe)
        self.pairs = settings.pairs()
        self.batches = batches(len(self.pairs), settings.batch_size, tuple(segments))
        self.batch_of = {i: b for b in self.batches for i in b}
        self.references_rejected = 0
        if references is not None:
            self.references, self.references_generated = self._given(references), 0
        else:
            self.references, self.references_generated = self._references()
        self.fp_component_bytes = self._component_bytes()
        self.ref_feats = self.text_feats = None
        if clip is not None:
            self.ref_feats = clip_features(clip, self.references)
            self.text_feats = clip.text_features([p for p, _ in self.pairs]).cpu()
        self.setup_s = time.perf_counter() - start

    def _given(self, images: torch.Tensor) -> torch.Tensor:
        n, h, w = len(self.pairs), self.settings.height, self.settings.width
        if images.dim() != 4 or images.shape[:2] != (n, 3) or (h and tuple(images.shape[2:]) !=
                                                                 (h, w)) or \
                not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise InputError(f"the shared references ({tuple(images.shape)}) are not {n} images "
                             f"in [0, 1] for these settings")
        images = images.float().cpu()
        for i, img in enumerate(images):
            self._save(i, img)
        return images

    def _batch_pairs(self, i: int) -> list[tuple[str, int]]:
        return [self.pairs[j] for j in self.batch_of[i]]

    def _save(self, i: int, image: torch.Tensor) -> None:
        self.cache.save(self.model_key, self.settings, *self.pairs[i], image,
                        batch=self._batch_pairs(i), render=self.render)

    def _references(self) -> tuple[torch.Tensor, int]:
        found = {i: self.cache.load(self.model_key, self.settings, p, s,
                                    batch=self._batch_pairs(i), render=self.render)
                 for i, (p, s) in enumerate(self.pairs)}
        self.references_rejected = len(self.cache.rejected)
        self.cache.report_rejected()
        # a batch with any image missing is made whole: its images are the ones a candidate's
        # batch is compared with
        todo = [b for b in self.batches if any(found[i] is None for i in b)]
        if todo:
            images = _generate(self.pipe, self.settings,
                               [[self.pairs[i] for i in b] for b in todo], self.progress,
                               desc="full-precision references")
            for i, img in zip([i for b in todo for i in b], images):
                if found[i] is None:
                    self._save(i, img)
                    found[i] = img
        return torch.stack([found[i] for i in range(len(self.pairs))]), \
            sum(len(b) for b in todo)

    def _component_bytes(self) -> int:
        comps = components_of(self.pipe)
        return sum(measured_bytes(comps[c]) for c in self.components)

    def _measure(self, idx: list[int], progress: bool = False) -> tuple[dict, float, float]:
        """Generate the pairs ``idx`` with the pipeline as it stands and score them against the
        references: ``(per-image metrics, generation s, metrics s)``. Raises on NaN/inf images."""
        t0 = time.perf_counter()
        images = self._images(idx, progress)
        t_gen = time.perf_counter() - t0
        if not torch.isfinite(images).all():
            raise NonFiniteError("the quantized pipeline produced non-finite images (NaN/inf)")
        self.last_images = images  # kept for whoever wants to look (the search stores a grid)
        per = pixel_metrics(images, self.references[idx])
        if self.clip is not None:
            per.update(clip_metrics(clip_features(self.clip, images), self.ref_feats[idx],
                                    self.text_feats[idx]))
        return per, t_gen, time.perf_counter() - t0 - t_gen

    def _images(self, idx: list[int], progress: bool = False) -> torch.Tensor:
        """The images ``idx``, made in the references' batches: a batch is always made whole
        (what a subset that cuts one costs), so each image is made exactly as its reference."""
        asked = set(idx)
        wanted = [b for b in self.batches if asked.intersection(b)]
        made = _generate(self.pipe, self.settings, [[self.pairs[i] for i in b] for b in wanted],
                         progress)
        at = {i: k for k, i in enumerate(i for b in wanted for i in b)}
        return made[[at[i] for i in idx]]

    def images(self, subset: list[int] | None = None) -> torch.Tensor:
        """The images ``subset`` (indices into the pairs; default all) of the pipeline as it
        stands, made in the references' batches. Raises on NaN/inf images."""
        images = self._images(list(range(len(self.pairs))) if subset is None else list(subset))
        if not torch.isfinite(images).all():
            raise NonFiniteError("the quantized pipeline produced non-finite images (NaN/inf)")
        return images

    def score(self, subset: list[int] | None = None) -> tuple[dict, float, float]:
        """Aggregated metrics of the pipeline as it stands on ``subset`` (indices into the pairs;
        default all): ``(metrics, generation s, metrics s)``."""
        per, t_gen, t_met = self._measure(list(range(len(self.pairs))) if subset is None
                                          else list(subset))
        return aggregate(per), t_gen, t_met

    def evaluate(self, recipe: Recipe | None = None, label: str | None = None) -> EvalResult:
        """Score ``recipe`` (None: full precision). The pipeline is back in full precision after."""
        t0 = time.perf_counter()
        if recipe is not None:
            from ..plans.apply import as_recipe

            recipe = as_recipe(recipe)
        summary = None
        memory = self.memory
        # under a memory plan the quantized components run wholly on its GPU
        with (memory.unstreamed(self.components) if memory is not None and recipe is not None
              else contextlib.nullcontext()):
            if recipe is not None:
                summary = apply_recipe(self.pipe, recipe, progress=False, keep_originals=True,
                                       scope=self.components,
                                       device=memory.device if memory is not None else None,
                                       move=self.components if memory is not None else None)
            t_apply = time.perf_counter() - t0
            if self.compile:
                from ..runtime.compile import compile_pipeline

                compile_pipeline(self.pipe, self.components)
            try:
                comps = components_of(self.pipe)
                comp_bytes = sum(measured_bytes(comps[c]) for c in self.components)
                pipe_bytes = sum(measured_bytes(m) for m in comps.values())
                per, t_gen, t_metrics = self._measure(list(range(len(self.pairs))),
                                                      self.progress)
            finally:
                if recipe is not None:
                    revert(self.pipe)
        total = time.perf_counter() - t0
        bad = {k: v for k, v in per.items() if torch.isnan(v).any() or
               (k != "psnr" and not torch.isfinite(v).all())}
        if bad:
            raise NonFiniteError(f"metrics are not finite for {sorted(bad)}: not a score")
        per_image = [{"prompt": p, "seed": s, **{k: v[i].item() for k, v in per.items()}}
                     for i, (p, s) in enumerate(self.pairs)]
        weight_params = sum(l.weight_params for l in self.inventory
                            if l.component in self.components)
        linear_fp = sum(l.bytes for l in self.inventory if l.component in self.components)
        return EvalResult(
            label=label or ("full precision" if recipe is None else "recipe"),
            metrics=aggregate(per), per_image=per_image, bytes=comp_bytes,
            pipeline_bytes=pipe_bytes, fp_bytes=self.fp_component_bytes,
            bits_per_weight=(summary.bits_per_weight if summary else 8 * linear_fp / weight_params),
            fp_share=summary.fp_share if summary else 1.0,
            latency_s=t_gen / len(self.pairs),
            timing={"generation_s": t_gen, "metrics_s": t_metrics, "apply_s": t_apply,
                    "overhead_s": total - t_gen - t_metrics - t_apply, "total_s": total,
                    "setup_s": self.setup_s},
            images=len(self.pairs), components=list(self.components),
            summary=summary.to_dict() if summary else None)


def evaluation_memory(pipe: Any, device: str, cap: int, recipe: Recipe | None = None,
                      components: list[str] | None = None):
    """The GPU memory plan of evaluating ``recipe`` under ``cap`` bytes (``--gpu-memory``): the
    recipe's assembled components must fit on the GPU (else a clear error, nothing loaded);
    the rest streams through it. Placed: pass it as ``Evaluator(memory=...)``."""
    from ..runtime.memory import MemoryPlan

    comps = components or default_components(pipe)
    inv = inventory(pipe)
    plan_bytes = (recipe or Recipe()).resolve(inv).nbytes(comps)
    return MemoryPlan(pipe, device, cap, comps, plan_bytes, enforce=True, inv=inv).place()


def evaluate_replaced(evaluator: Evaluator, component: str, module: Any,
                      label: str, linear_bytes: int | None = None) -> EvalResult:
    """Score the pipeline with ``component`` replaced by ``module`` (e.g. a transformer loaded
    from an exported file) against the evaluator's full-precision references; the original
    component is put back after. ``linear_bytes``: what the file holds for its Linear layers,
    where ``module`` holds them dequantized (default: measured on ``module``)."""
    pipe = evaluator.pipe
    original = components_of(pipe)[component]
    device = next(original.parameters()).device
    setattr(pipe, component, module.to(device))
    try:
        result = evaluator.evaluate(None, label=label)
    finally:
        setattr(pipe, component, original)
    inv = inventory(pipe)  # the original's layers: bits per weight of the file's weights
    weights = sum(l.weight_params for l in inv if l.component == component)
    linear = linear_bytes if linear_bytes is not None else sum(
        measured_bytes(m) for m in module.modules() if isinstance(m, torch.nn.Linear))
    extra = {} if linear_bytes is None else {
        "bytes": result.bytes - sum(measured_bytes(m) for m in module.modules()
                                    if isinstance(m, torch.nn.Linear)) + linear_bytes}
    return dataclasses.replace(result, bits_per_weight=8 * linear / max(weights, 1),
                               fp_share=float("nan"), **extra)
