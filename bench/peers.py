"""Side by side with the tools people install instead (the peers issue), on the demo pipeline,
scored by autoquant's own evaluator on the held-out prompts and seeds.

    pip install -e ".[peers]"        # nvidia-modelopt (diffusers and torchao are core deps)
    python bench/peers.py [--trials 12] [--only diffusers,modelopt] [--json bench/results/peers_cpu.json]
    python bench/peers.py --device cuda --only diffusers [--pruna-json ...]   # the GPU-only rows
    # (on the GPU machine, without MiniLM's weights: AUTOQUANT_DEMO_TEXT, see bench/_offline_text.py)
    python bench/peers.py --only "" --resume OLD.json [--pruna-json NEW.json] [--rematch-bits 7]
    # keep an earlier run's rows; search only where a row has no match yet (or, with
    # --rematch-bits, every row of at least that many bits: after a change to the search)

Each peer quantizes the denoiser through its own public API, as its documentation tells a user:

- **diffusers**: ``PipelineQuantizationConfig`` with ``BitsAndBytesConfig`` (nf4, fp4, int8) and
  ``TorchAoConfig`` (each torchao type), loaded with ``DemoPipeline.from_pretrained(demo_folder(),
  quantization_config=...)``, without and with the usual skip list (``modules_to_not_convert`` /
  ``llm_int8_skip_modules`` = the layers ``--protect default`` keeps); and autoquant's best
  torchao-only plan handed to diffusers as a per-module ``FqnToConfig``;
- **NVIDIA ModelOpt**: ``mtq.auto_quantize`` (per-layer format search under an effective-bits
  constraint; loss = MSE to the full-precision denoiser output on captured denoiser inputs) at the
  effective bits of each autoquant budget, and ``mtq.quantize`` with its uniform configs. ModelOpt
  simulates quantization (fake-quant modules holding the float weights): its rows report its
  effective bits and, separately, the bytes a deployment of those formats would hold;
- **Pruna** (``pruna`` on PyPI, its own venv: it pins torchao and hqq versions that clash with
  ours): run by ``bench/peers_pruna.py`` in that venv; its JSON comes in with ``--pruna-json``.

Every row that cannot run here (a GPU-only config on a CPU, a package missing) is kept, with the
exact error. Bytes are what the quantized modules really hold (every tensor storage, measured);
then autoquant searches at each row's bytes (one sensitivity pass, ``Search.retarget``) and the
difference is printed per row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import autoquant
from autoquant.backends.measure import measured_bytes
from autoquant._format import human_bytes, table
from autoquant.scoring.baseline import protected_layers
from autoquant.search import Search, SearchConfig, run_search
from autoquant.search.space import SearchSpace, load_space

from _common import device_name, environment, write_json
from _demo import demo_bench, search_settings

@dataclasses.dataclass
class Row:
    peer: str
    config: str
    skip: str = "none"  # none | usual
    where: str = "cpu"  # the device the row ran on (a GPU by its name)
    bytes: int | None = None
    bits_per_weight: float | None = None
    psnr: float | None = None
    psnr_worst: float | None = None
    ssim: float | None = None
    clip_fidelity: float | None = None
    s_per_image: float | None = None
    skipped_layers: list[str] | None = None
    deployment_bytes: int | None = None
    effective_bits: float | None = None
    error: str | None = None
    seconds: float | None = None
    autoquant: dict | None = None


def _short_error(e: BaseException) -> str:
    last = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" ({Path(last.filename).name}:{last.lineno})" if last else ""
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}{where}"


def _plain_linears(module: nn.Module) -> list[str]:
    """Linear layers still holding a plain float weight (what a skip list really skipped)."""
    return [n for n, m in module.named_modules() if type(m) is nn.Linear
            and type(m.weight) in (torch.Tensor, nn.Parameter) and m.weight.dtype.is_floating_point
            and m.weight.element_size() >= 2]


class Scorer:
    """Scores a denoiser put into the demo pipeline in place of the full-precision one."""

    def __init__(self, holdout):
        self.holdout = holdout
        self.pipe = holdout.pipe
        self.fp = self.pipe.transformer
        self.params = sum(p.numel() for p in self.fp.parameters())
        self.device = next(self.fp.parameters()).device
        self.where = device_name(self.device)

    def score(self, row: Row, transformer: nn.Module) -> Row:
        self.pipe.transformer = transformer
        try:
            metrics, t_gen, _ = self.holdout.score()
        finally:
            self.pipe.transformer = self.fp
        row.bytes = measured_bytes(transformer)
        row.bits_per_weight = 8 * row.bytes / self.params
        row.psnr, row.psnr_worst = metrics["psnr"]["mean"], metrics["psnr"]["worst"]
        row.ssim = metrics.get("ssim", {}).get("mean")
        row.clip_fidelity = metrics.get("clip_fidelity", {}).get("mean")
        row.s_per_image = t_gen / len(self.holdout.pairs)
        return row


def run_row(scorer: Scorer, row: Row, build: Callable[[], nn.Module],
            post: Callable[[Row, nn.Module], None] | None = None) -> Row:
    t = time.perf_counter()
    try:
        transformer = build()
        row.skipped_layers = _plain_linears(transformer)
        scorer.score(row, transformer)
        if post is not None:
            post(row, transformer)
    except Exception as e:  # a peer that cannot run here is a row with its error, not a crash
        row.error = _short_error(e)
    row.seconds = time.perf_counter() - t
    status = (f"{human_bytes(row.bytes)}, {row.psnr:.2f} dB" if row.error is None
              else f"ERROR {row.error}")
    print(f"{row.peer:9s} {row.config:28s} skip={row.skip:5s} {status}", flush=True)
    return row


# -- diffusers ---------------------------------------------------------------------------------
def _diffusers_load(quant_config, device: torch.device) -> nn.Module:
    from autoquant._compat import dtype_kwargs
    from autoquant.models.pipelines import default_dtype
    from autoquant.models.zoo import DemoPipeline, demo_folder

    from _offline_text import attach, components  # (GPU machine: MiniLM's states, tabled)

    # on a GPU, loaded onto it as diffusers' docs do (device_map "cuda", not "cuda:0"):
    # bitsandbytes quantizes there
    where = {"device_map": device.type} if device.type == "cuda" else {}
    pipe = attach(DemoPipeline.from_pretrained(demo_folder(), quantization_config=quant_config,
                                               **dtype_kwargs(default_dtype(device)), **where,
                                               **components()))
    return pipe.transformer


def diffusers_rows(scorer: Scorer, usual: list[str]) -> list[Row]:
    device = scorer.device
    from diffusers import BitsAndBytesConfig, PipelineQuantizationConfig, TorchAoConfig
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                      Float8WeightOnlyConfig, Int4WeightOnlyConfig,
                                      Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
                                      IntxWeightOnlyConfig, PerGroup)

    rows = []
    bnb = {"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
           "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
           "int8": dict(load_in_8bit=True)}
    for name, kw in bnb.items():
        for skip in ("none", "usual"):
            extra = {"llm_int8_skip_modules": usual} if skip == "usual" else {}
            cfg = PipelineQuantizationConfig(quant_mapping={
                "transformer": BitsAndBytesConfig(**kw, **extra)})
            rows.append(run_row(scorer, Row("diffusers", f"bitsandbytes {name}", skip,
                                            scorer.where),
                                lambda cfg=cfg: _diffusers_load(cfg, device)))
    ao = {"int8_weight_only": Int8WeightOnlyConfig,
          "int8_dynamic_activation_int8_weight": Int8DynamicActivationInt8WeightConfig,
          "float8_weight_only": Float8WeightOnlyConfig,
          "float8_dynamic_activation_float8_weight": Float8DynamicActivationFloat8WeightConfig,
          "int4_weight_only": lambda: Int4WeightOnlyConfig(group_size=64),
          "intx4_weight_only g64": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                                granularity=PerGroup(64)),
          "intx3_weight_only g64": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int3,
                                                                granularity=PerGroup(64)),
          "intx2_weight_only g64": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int2,
                                                                granularity=PerGroup(64))}
    for name, make in ao.items():
        for skip in ("none", "usual"):
            def build(make=make, skip=skip):
                tcfg = TorchAoConfig(make(), modules_to_not_convert=usual if skip == "usual"
                                     else None)
                return _diffusers_load(PipelineQuantizationConfig(
                    quant_mapping={"transformer": tcfg}), device)
            rows.append(run_row(scorer, Row("diffusers", f"torchao {name}", skip, scorer.where),
                                build))
    return rows


def diffusers_fqn_row(scorer: Scorer, recipe_path: Path) -> Row:
    """autoquant's best torchao-only plan, handed to diffusers as an ``FqnToConfig``."""
    from diffusers import PipelineQuantizationConfig, TorchAoConfig
    from torchao.quantization import FqnToConfig

    from autoquant.backends.torchao import _torchao_config

    def build():
        recipe = autoquant.load_recipe(recipe_path)
        plan = recipe.resolve(autoquant.inventory(scorer.pipe))
        mapping = {name.split(".", 1)[1]: _torchao_config(cfg)
                   for name, cfg in plan.configs.items()
                   if name.startswith("transformer.") and cfg.method == "torchao"}
        return _diffusers_load(PipelineQuantizationConfig(
            quant_mapping={"transformer": TorchAoConfig(FqnToConfig(mapping))}), scorer.device)
    return run_row(scorer, Row("diffusers", "autoquant torchao plan as FqnToConfig", "plan",
                               scorer.where), build)


# -- ModelOpt ----------------------------------------------------------------------------------
def _captured_batches(scorer: Scorer, n: int = 16) -> list[tuple[tuple, dict]]:
    """Denoiser calls (args, kwargs) recorded during full-precision generation of the search
    prompts: ModelOpt's calibration and scoring data."""
    from autoquant.scoring.evaluator import generate_images

    calls: list = []

    def hook(_m, args, kwargs):
        if len(calls) < n:
            calls.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args),
                          {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()}))
    h = scorer.fp.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        s = search_settings()
        generate_images(scorer.pipe, s, s.pairs()[:4])
    finally:
        h.remove()
    with torch.no_grad():
        return [(a, k, _out(scorer.fp(*a, **k)).detach()) for a, k in calls]


def _denoising_batches(scorer: Scorer, data: list) -> list:
    """auto_quantize scores layers by the gradient of its loss; MSE to the full-precision output
    is zero with zero gradient at the full-precision model, so every format scored 0 and the
    smallest won at every budget (measured: all-int4 at effective_bits 8). The loss that fits a
    denoiser is the one it was trained with: for each captured call at timestep t, the clean
    latent the full-precision prediction implies, noised afresh, and the new noise as target."""
    sched = scorer.pipe.scheduler
    gen = torch.Generator().manual_seed(0)
    out = []
    for args, kwargs, pred in data:
        h, t = args[0], kwargs["timestep"]
        abar = sched.alphas_cumprod[t.long().cpu()].view(-1, 1, 1, 1).to(h.dtype)
        eps_hat = pred[:, :h.shape[1]]
        x0 = (h - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
        eps = torch.randn(h.shape, generator=gen).to(h.dtype)
        out.append(((abar.sqrt() * x0 + (1 - abar).sqrt() * eps, *args[1:]), kwargs, eps))
    return out


def _f32(x):
    """Floating tensors of a captured call in float32 (auto_quantize scores in float32: its
    gradient pass wants it)."""
    if isinstance(x, dict):
        return {k: _f32(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_f32(v) for v in x)
    return x.float() if torch.is_tensor(x) and x.is_floating_point() else x


def _out(result):
    """The denoiser's prediction, whether it returned a tuple (``return_dict=False``) or not."""
    return result[0] if isinstance(result, tuple) else result.sample


def _deployment_bytes(model: nn.Module, params_total: int) -> tuple[int, float]:
    """(bytes a deployment of the chosen formats would hold, effective bits per weight): each
    quantized Linear at its weight bits plus one scale (16 bits) per block (or per row), every
    other parameter at its own size."""
    total_bits, seen = 0, set()
    for name, m in model.named_modules():
        wq = getattr(m, "weight_quantizer", None)
        if wq is None or not hasattr(m, "weight"):
            continue
        seen.add(id(m.weight))
        n = m.weight.numel()
        if getattr(wq, "is_enabled", False):
            bits = wq.num_bits if isinstance(wq.num_bits, int) else sum(wq.num_bits) + 1
            block = (wq.block_sizes or {}).get(-1) if getattr(wq, "block_sizes", None) else None
            scales = n // block if block else m.weight.shape[0]
            total_bits += n * bits + scales * 16
        else:
            total_bits += n * m.weight.element_size() * 8
        if getattr(m, "bias", None) is not None:
            seen.add(id(m.bias))
            total_bits += m.bias.numel() * m.bias.element_size() * 8
    for p in model.parameters():
        if id(p) not in seen:
            total_bits += p.numel() * p.element_size() * 8
    return total_bits // 8, total_bits / params_total


def modelopt_rows(scorer: Scorer, effective_bits: list[float]) -> list[Row]:
    import copy

    try:
        import modelopt.torch.quantization as mtq
    except Exception as e:
        return [Row("modelopt", "auto_quantize", error=_short_error(e))]
    data = _captured_batches(scorer)
    rows = []

    def deployment(row: Row, model: nn.Module) -> None:
        row.deployment_bytes, row.effective_bits = _deployment_bytes(model, scorer.params)

    formats = {"INT4_BLOCKWISE_WEIGHT_ONLY_CFG": getattr(mtq, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
                                                          None),
               "INT8_WEIGHT_ONLY_CFG": getattr(mtq, "INT8_WEIGHT_ONLY_CFG", None),
               "INT8_DEFAULT_CFG": mtq.INT8_DEFAULT_CFG, "FP8_DEFAULT_CFG": mtq.FP8_DEFAULT_CFG,
               "INT4_AWQ_CFG": mtq.INT4_AWQ_CFG}
    formats = {k: v for k, v in formats.items() if v is not None}

    def forward_loop(model):
        for a, k, _ in data:
            model(*a, **k)

    for name, cfg in formats.items():  # uniform configs
        def build(cfg=cfg):
            model = copy.deepcopy(scorer.fp)
            return mtq.quantize(model, cfg, forward_loop)
        row = run_row(scorer, Row("modelopt", f"mtq.quantize {name}", where=scorer.where), build,
                      deployment)
        rows.append(row)
    for bits in effective_bits:
        def build(bits=bits):
            model = copy.deepcopy(scorer.fp).float().requires_grad_(True)
            model, state = mtq.auto_quantize(
                model, constraints={"effective_bits": bits},
                quantization_formats=[formats[k] for k in (
                    "INT4_AWQ_CFG", "INT8_WEIGHT_ONLY_CFG", "INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG")
                    if k in formats],
                data_loader=_denoising_batches(scorer, data),
                forward_step=lambda m, b: _out(m(*_f32(b[0]), **_f32(b[1]))),
                loss_func=lambda out, b: torch.nn.functional.mse_loss(
                    out[:, :b[2].shape[1]].float(), b[2].float()),
                num_calib_steps=len(data), num_score_steps=len(data))
            return model.to(scorer.fp.dtype)
        row = run_row(scorer, Row("modelopt", f"auto_quantize effective_bits={bits:.2f}",
                                  where=scorer.where), build, deployment)
        rows.append(row)
    return rows


# -- autoquant at each row's bytes -------------------------------------------------------------
def autoquant_at(search: Search, holdout, nbytes: int, folder: Path) -> dict:
    try:
        search.retarget(str(nbytes), folder)
    except autoquant.AutoquantError as e:
        return {"error": str(e)}
    run_search(search)
    r = holdout.evaluate(autoquant.load_recipe(folder / "best.yaml"), "autoquant")
    return {"bytes": r.bytes, "psnr": r.metrics["psnr"]["mean"],
            "psnr_worst": r.metrics["psnr"]["worst"], "ssim": r.metrics["ssim"]["mean"],
            "clip_fidelity": r.metrics["clip_fidelity"]["mean"], "recipe": str(folder / "best.yaml")}


def _rows(results: dict) -> list[Row]:
    """The rows of an earlier ``--json`` (or of ``bench/peers_pruna.py``'s)."""
    fields = {f.name for f in dataclasses.fields(Row)}
    return [Row(**{k: v for k, v in r.items() if k in fields}) for r in results["rows"]]


def _matched(row: Row) -> bool:
    """Whether autoquant already has a result at ``row``'s bytes."""
    return bool(row.autoquant and "psnr" in row.autoquant)


def torchao_only_space() -> SearchSpace:
    d = load_space("default").to_dict()
    d["candidates"] = [c for c in d["candidates"] if c["method"] in ("torchao", "none")]
    return SearchSpace.from_dict(d, name="torchao-only")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=12, help="autoquant trials per matched budget")
    ap.add_argument("--only", default="diffusers,fqn,modelopt")
    ap.add_argument("--json", default="bench/results/peers_cpu.json")
    ap.add_argument("--pruna-json", default=None,
                    help="rows from bench/peers_pruna.py (run in Pruna's venv) to match too")
    ap.add_argument("--device", default="cpu",
                    help="where the pipeline, the peers and autoquant's searches run (cuda: the "
                         "GPU-only peer configs)")
    ap.add_argument("--resume", default=None,
                    help="an earlier run's --json: its rows stay (a row that --pruna-json measures "
                         "again is replaced) and only rows without autoquant's match get a search")
    ap.add_argument("--rematch-bits", type=float, default=None,
                    help="with --resume: search again at the bytes of the rows of at least this "
                         "many bits per weight (after a change to the search)")
    ap.add_argument("--markdown", action="store_true",
                    help="print the BENCHMARKS.md table of an earlier run's --json and stop")
    args = ap.parse_args(argv)
    if args.rematch_bits is not None and not args.resume:
        ap.error("--rematch-bits needs --resume (the earlier run whose rows are searched again)")
    if args.markdown:
        print(markdown(json.loads(Path(args.json).read_text())["rows"]))
        return 0
    only = set(args.only.split(",")) if args.only else set()
    pipe, clip, holdout, base = demo_bench({}, args.device)
    scorer = Scorer(holdout)
    inv = autoquant.inventory(pipe)
    usual = [n.split(".", 1)[1] for n in protected_layers(inv, ["transformer"])]
    out: dict[str, Any] = {"environment": environment(args.device), "usual_skip_list": usual,
                           "rows": []}
    rows: list[Row] = []
    if args.resume:
        earlier = json.loads(Path(args.resume).read_text())
        rows, out["how"] = _rows(earlier), earlier.get("how", {})
        if args.rematch_bits is not None:
            for r in rows:  # ModelOpt's rows by their deployed bits
                if (r.effective_bits or r.bits_per_weight or 0) >= args.rematch_bits:
                    r.autoquant = None
    tmp = Path(tempfile.mkdtemp(prefix="peers-"))
    search = Search(SearchConfig(model="demo", budget="50%", space=load_space("default"),
                                 trials=args.trials, out=tmp / "x", settings=search_settings(),
                                 clip=clip, progress=False, device=args.device), pipe)
    search.prepare()

    def save():
        out["rows"] = [dataclasses.asdict(r) for r in rows]
        write_json(args.json, out)

    if "diffusers" in only:
        rows += diffusers_rows(scorer, usual)
        save()
    if "fqn" in only:  # autoquant's best torchao-only plan at int8's bytes, through diffusers
        ao = Search(SearchConfig(model="demo", budget="60%", space=torchao_only_space(),
                                 trials=args.trials, out=tmp / "ao", settings=search_settings(),
                                 clip=clip, progress=False, device=args.device), pipe)
        run_search(ao)
        rows.append(diffusers_fqn_row(scorer, tmp / "ao" / "best.yaml"))
        save()
    if "modelopt" in only:
        bits = [4.5, 6.0, 8.0]
        rows += modelopt_rows(scorer, bits)
        save()
    if args.pruna_json:  # rows bench/peers_pruna.py measured in Pruna's venv
        new = _rows(json.loads(Path(args.pruna_json).read_text()))
        again = {(r.peer, r.config, r.skip) for r in new}
        rows = [r for r in rows if (r.peer, r.config, r.skip) not in again] + new
        save()
    # autoquant at each row's bytes, fewest bits first (the 4-bit targets before the 8-bit
    # rows); a row within 1% above an earlier row's bytes shares that search (equal or fewer
    # bytes) unless the row is within 2 dB of it: then it gets a search at its own bytes
    matched: dict[int, dict] = {(r.deployment_bytes or r.bytes): r.autoquant for r in rows
                                if _matched(r)}
    for i in sorted(range(len(rows)), key=lambda i: rows[i].bits_per_weight or 99):
        row = rows[i]
        nbytes = row.deployment_bytes or row.bytes
        if row.error is None and nbytes and not _matched(row):
            near = [b for b in matched if 0.99 * nbytes <= b <= nbytes
                    and matched[b].get("psnr", -1e9) >= row.psnr + 2]
            if not near and nbytes not in matched:
                matched[nbytes] = autoquant_at(search, holdout, nbytes, tmp / f"r{i}")
            row.autoquant = matched[max(near) if near else nbytes]
            save()
    table_rows = []
    for r in rows:
        aq = r.autoquant or {}
        delta = (f"{aq['psnr'] - r.psnr:+.2f}" if "psnr" in aq and r.psnr is not None else "")
        shown = r.deployment_bytes or r.bytes  # ModelOpt: what a deployment would hold
        table_rows.append([r.peer, r.config, r.skip, human_bytes(shown) if shown else "-",
                           f"{r.psnr:.2f}" if r.psnr is not None else (r.error or "")[:60],
                           human_bytes(aq["bytes"]) if "bytes" in aq else aq.get("error", "")[:40],
                           f"{aq['psnr']:.2f}" if "psnr" in aq else "", delta])
    print(table(table_rows, ["peer", "config", "skip", "bytes", "PSNR (held-out)",
                             "autoquant bytes", "autoquant PSNR", "d PSNR"]))
    save()
    print("\n" + markdown(out["rows"]))
    return 0


def markdown(rows: list[dict]) -> str:
    """The BENCHMARKS.md table: one line per peer row, autoquant at its bytes beside it."""
    lines = ["| peer | config | skip list | bytes (bits/weight) | PSNR | SSIM | CLIP fid | "
             "autoquant at those bytes: bytes, PSNR, SSIM, CLIP fid | d PSNR |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shown = r.get("deployment_bytes") or r.get("bytes")
        if r.get("error"):
            lines.append(f"| {r['peer']} | {r['config']} | {r['skip']} | - | "
                         f"**does not run here**: `{r['error']}` | | | | |")
            continue
        bits = (f" ({r['effective_bits']:.2f} eff.)" if r.get("effective_bits")
                else f" ({r['bits_per_weight']:.2f})")
        aq = r.get("autoquant") or {}
        ours = (f"{human_bytes(aq['bytes'])}, {aq['psnr']:.2f}, {aq['ssim']:.4f}, "
                f"{aq['clip_fidelity']:.4f}" if "psnr" in aq else aq.get("error", "-"))
        delta = f"**{aq['psnr'] - r['psnr']:+.2f}**" if "psnr" in aq else ""
        lines.append(f"| {r['peer']} | {r['config']} | {r['skip']} | {human_bytes(shown)}{bits} | "
                     f"{r['psnr']:.2f} | {r['ssim']:.4f} | {r['clip_fidelity']:.4f} | {ours} | "
                     f"{delta} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
