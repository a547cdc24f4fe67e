"""The ``autoquant`` command line's arguments: one builder per command, and the argument types
that refuse bad values while parsing (before anything is imported or loaded)."""

from __future__ import annotations

import argparse


def _checked(cast, what: str, ok, rule: str):
    """An argument type: ``cast`` the text, refuse it with ``rule`` unless ``ok(value)``."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} {rule}")
        return value
    return parse


_positive_int = _checked(int, "a whole number", lambda v: v >= 1, "must be at least 1")
_positive_float = _checked(float, "a number", lambda v: 0 < v < float("inf"),
                           "must be a positive number")
#: numpy's and Optuna's samplers take seeds below 2**32; so does every seed autoquant passes on
MAX_SEED = 2**32 - 1
_seed = _checked(int, "a whole number", lambda v: 0 <= v <= MAX_SEED,
                 f"must be a whole number from 0 to {MAX_SEED} (2**32 - 1)")
#: every diffusers pipeline makes images whose sides are multiples of 8 (the VAE's factor)
MAX_SIZE = 8192
_image_size = _checked(int, "a whole number", lambda v: 8 <= v <= MAX_SIZE and v % 8 == 0,
                       f"is not an image side autoquant can ask for: a multiple of 8 from 8 to "
                       f"{MAX_SIZE} (the model may need a multiple of 16)")


def _image_file(text: str) -> str:
    """An image path whose extension Pillow can write (checked now, not after the work)."""
    from .checks import image_format

    try:
        image_format(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _add_model(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required,
                   help="built-in name (demo, demo-flux, tiny-flux, tiny-sd), local diffusers folder, "
                        "or hub id")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights dtype; auto: bfloat16 on a GPU or a CPU with bf16 instructions, "
                        "float32 on other CPUs (where bf16 is emulated and ~5x slower)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")


def _add_eval_options(p: argparse.ArgumentParser, prompt_set: bool = True,
                      batch_size: int = 8) -> None:
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompts file, one prompt per line (default: the model's built-in set)")
    if prompt_set:
        p.add_argument("--prompt-set", default="holdout", choices=["search", "holdout"],
                       help="built-in prompt set when --prompts is not given (default holdout)")
    p.add_argument("--seeds", type=_seed, nargs="+", default=None,
                   help="one image per prompt and seed (default: the set's seeds)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="denoising steps (model default)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (model default)")
    p.add_argument("--size", type=_image_size, default=None,
                   help="image height and width in pixels (a multiple of 8)")
    p.add_argument("--batch-size", type=_positive_int, default=batch_size,
                   help=f"images generated at once (default {batch_size}); references are cached "
                        f"per batch, since a batched matmul can round differently")
    p.add_argument("--clip", default=None,
                   help="CLIP for fidelity: demo, ARCH/TAG or ARCH/checkpoint (default: the model's)")
    p.add_argument("--no-clip", action="store_true", help="skip the CLIP metrics")
    p.add_argument("--device", default=None, help="run on this device: cpu, cuda or cuda:N")


def build_parser(commands: dict) -> argparse.ArgumentParser:
    """The command line; ``commands``: name -> the function that runs it."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="autoquant",
        description="Per-layer, cross-backend quantization of diffusion pipelines.")
    parser.add_argument("--version", action="version", version=f"autoquant {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks and the libraries' own messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add in (("search", _search), ("apply", _apply), ("evaluate", _evaluate),
                      ("baseline", _baseline), ("inspect", _inspect), ("report", _report),
                      ("export", _export)):
        add(sub).set_defaults(func=commands[name])
    return parser


def _search(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("search", help="search per-layer plans under a memory budget")
    _add_model(p)
    p.add_argument("--budget", required=True,
                   help="bytes of the searched components (6GB, 5.5GiB), a share of full "
                        "precision (35%%) or bits per weight (4.25bpw)")
    p.add_argument("--space", default="default",
                   help="a shipped search space (autoquant inspect --spaces lists them) or a "
                        "YAML file")
    p.add_argument("--allow-fp-cap", action="store_true",
                   help="allow a space's fp_cap above 0.20")
    p.add_argument("--trials", type=_positive_int, default=30,
                   help="trials the study should hold in total, over every worker (default 30)")
    p.add_argument("--timeout", type=_positive_float, default=None,
                   help="stop this worker after this many seconds")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL shared by the workers (default: SQLite in --out); "
                        "postgresql://user@host/db needs pip install \"autoquant[postgres]\"")
    p.add_argument("--study", default=None,
                   help="study name (default: autoquant-MODEL-BUDGET); a worker with the same "
                        "settings joins it")
    p.add_argument("--out", default="autoquant-search",
                   help="folder for study.db, artifacts, studies/STUDY/{best.yaml,pareto/,report.json}"
                        " and, at its top, the outputs of the study that wrote last")
    p.add_argument("--artifacts", default=None, metavar="DIR|s3://BUCKET/PREFIX",
                   help="where the study's shared inputs and images go: a folder every worker "
                        "reaches (default OUT/artifacts), or s3://bucket[/prefix] / "
                        "gs://bucket[/prefix], which needs no shared disk")
    p.add_argument("--devices", default=None, metavar="LIST",
                   help="one worker process per device on this machine, sharing the study: "
                        "cuda:0,cuda:1,... or all")
    p.add_argument("--resume", action="store_true",
                   help="continue a study that must exist (without it, an existing study with "
                        "the same settings is joined or continued anyway)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the proposals (default 0)")
    _add_eval_options(p, prompt_set=False, batch_size=20)
    p.add_argument("--sensitivity", default="auto",
                   choices=["auto", "full", "anchored", "images"],
                   help="full: replay the denoiser for every (layer group, config); anchored: "
                        "once per group (12x fewer on the demo, plans as good); images: "
                        "generate the search images for every (group, config) -- the slowest, "
                        "the most faithful (GGUF types, guided models); auto: full if it takes "
                        "<= 30 s")
    p.add_argument("--latency", default=None, metavar="LIMIT",
                   help="search step time too, within LIMIT: 1.0x (full precision's step) or "
                        "150ms; a space with a latency objective searches it without a limit")
    p.add_argument("--export", default=None, choices=SEARCH_EXPORT_FORMATS, metavar="FORMAT",
                   help="also write the best plan as a file of this format beside best.yaml "
                        "(best.<format>; BFL names for Flux); search a space of its types")
    p.add_argument("--latency-mode", default="eager", choices=["eager", "compile"],
                   help="time steps as deployed: eager, or under torch.compile")
    p.add_argument("--cache-gib", type=_positive_float, default=None,
                   help="GiB the quantized-layer cache may hold (default: on a GPU, what "
                        "--gpu-memory leaves; on a CPU, half the free memory)")
    _add_gpu_memory(p)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return p


def _add_gpu_memory(p) -> None:
    p.add_argument("--gpu-memory", default=None, metavar="BYTES",
                   help="keep the GPU's peak memory under this (24GiB, 16GB); what does not fit "
                        "streams from the CPU layer by layer (default: what the device has)")


def _apply(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("apply", help="apply a recipe to a pipeline")
    _add_model(p)
    p.add_argument("--recipe", required=True, help="recipe YAML (format autoquant-recipe/1)")
    p.add_argument("--device", default=None,
                   help="quantize layer by layer onto this device (cpu, cuda, cuda:N)")
    p.add_argument("--save", default=None, help="save the quantized pipeline to this folder")
    p.add_argument("--compile", action="store_true",
                   help="run the denoiser under torch.compile (faster steps after a first slow one)")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs",
                            "max-autotune"],
                   help="with --compile: torch.compile's mode (reduce-overhead / max-autotune "
                        "record CUDA graphs; max-autotune* tune kernels while compiling)")
    p.add_argument("--attention", default=None, metavar="BACKEND",
                   help="the denoiser's attention kernel, through diffusers' dispatcher: native "
                        "(SDPA's choice), cudnn (faster on Hopper), flash, efficient, math, flex, "
                        "or a diffusers AttentionBackendName")
    p.add_argument("--prompt", default=None, help="generate one image with this prompt")
    p.add_argument("--out", default="autoquant.png", type=_image_file,
                   help="where the image goes (.png, .jpg, .webp ...)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="denoising steps (model default)")
    p.add_argument("--size", type=_image_size, default=None,
                   help="image height and width (a multiple of 8)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the image's noise")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _evaluate(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="score a recipe's images against full precision")
    _add_model(p)
    p.add_argument("--recipe", default=None, help="recipe to evaluate (default: full precision)")
    p.add_argument("--gguf", default=None, metavar="FILE",
                   help="score a diffusers-named GGUF file of the denoiser (autoquant export "
                        "--names diffusers), loaded by diffusers itself, instead of a recipe")
    p.add_argument("--diffusers", default=None, metavar="FOLDER",
                   help="score the denoiser of a folder written by autoquant export --format "
                        "diffusers, loaded by diffusers' own from_pretrained, instead of a recipe")
    p.add_argument("--comfy", default=None, metavar="FILE",
                   help="score a ComfyUI checkpoint of the denoiser (autoquant export --format "
                        "comfy), its layers dequantized by comfy-kitchen as ComfyUI builds them")
    _add_eval_options(p)
    p.add_argument("--components", nargs="+", default=None,
                   help="components whose bytes count (default: the denoiser)")
    p.add_argument("--compile", action="store_true",
                   help="generate with the denoiser under torch.compile (as deployed)")
    _add_gpu_memory(p)
    p.add_argument("--cache-dir", default=None,
                   help="reference image cache (default $AUTOQUANT_CACHE/references)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    return p


#: the formats ``autoquant export`` writes (autoquant.export)
EXPORT_FORMATS = ("gguf", "diffusers", "comfy")
#: the formats ``search --export`` writes beside best.yaml
SEARCH_EXPORT_FORMATS = ("gguf", "diffusers")


def _export(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="write a recipe as a file other tools load (GGUF, a "
                                      "diffusers folder, a ComfyUI checkpoint)")
    _add_model(p, required=False)
    p.add_argument("--recipe", required=True, help="the recipe to export (e.g. best.yaml)")
    p.add_argument("--format", default=EXPORT_FORMATS[0], choices=EXPORT_FORMATS,
                   help="GGUF: one file of the denoiser (ComfyUI-GGUF, stable-diffusion.cpp, "
                        "diffusers' from_single_file); diffusers: a folder of the whole pipeline "
                        "that DiffusionPipeline.from_pretrained loads, or its denoiser as one "
                        "GGUF file (GGUF plans); comfy: a ComfyUI mixed-precision checkpoint of "
                        "a Flux denoiser (int8 and fp8 layers; 4-bit layers of groups of 64 "
                        "with --comfy-target awq)")
    p.add_argument("--out", required=True,
                   help="the file (GGUF, comfy) or folder (diffusers) to write")
    p.add_argument("--comfy-target", default="stable", choices=["stable", "awq"],
                   help="comfy format: the ComfyUI that loads the file: stable (ComfyUI >= "
                        "0.27.0: int8_tensorwise, float8_e4m3fn) or awq (also awq_w4a16, in "
                        "builds with Comfy-Org/ComfyUI#13580)")
    p.add_argument("--no-score", action="store_true",
                   help="diffusers and comfy formats: do not score the export on held-out "
                        "prompts for its model card (scoring loads it with its consumer's code "
                        "and generates the prompts' images twice: full precision and exported)")
    _add_eval_options(p)  # what the card's fidelity is measured with; --device: GPU-only configs
    p.add_argument("--names", default=None, choices=["bfl", "diffusers"],
                   help="tensor names: bfl (Black Forest Labs' layout, read by ComfyUI-GGUF and "
                        "stable-diffusion.cpp; the default for Flux) or diffusers (module paths, "
                        "for diffusers' from_single_file; ComfyUI refuses such Flux files)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="then upload the export and its model card to this Hugging Face model "
                        "repository (owner/name; created if missing; huggingface_hub's token)")
    p.add_argument("--private", action="store_true",
                   help="with --push-to-hub: create the repository private")
    p.add_argument("--component", default="transformer", help="the component to export")
    p.add_argument("--requantize", action="store_true",
                   help="re-quantize layers of non-GGUF methods from the original weights to "
                        "the GGUF type of the most bytes no larger than theirs (each mapping is "
                        "printed)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    return p


def _baseline(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("baseline", help="write a uniform recipe (one config for every layer)")
    _add_model(p)
    p.add_argument("--method", required=True, 
                   help="quantization method: any of the backend registry (autoquant inspect "
                        "--methods lists them with their options); checked before the model loads")
    p.add_argument("--bits", type=_positive_int, default=None,
                   help="bits (the method's default if absent)")
    p.add_argument("--options", nargs="*", default=None, metavar="KEY=VALUE",
                   help="method options (group_size=128 type=fp4 ...)")
    p.add_argument("--protect", default="none", choices=["none", "default"],
                   help="default: keep embedders and the final projection in full precision")
    p.add_argument("--components", nargs="+", default=None, help="default: the denoiser")
    p.add_argument("--out", required=True, help="where the recipe goes")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _inspect(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("inspect", help="list the quantizable layers of a pipeline, the methods "
                                         "or the shipped search spaces")
    _add_model(p, required=False)
    p.add_argument("--methods", action="store_true",
                   help="list the quantization methods (no model needed): options, package, "
                        "calibration, export formats")
    p.add_argument("--spaces", action="store_true",
                   help="list the shipped search spaces and their candidates (no model needed)")
    p.add_argument("--device", default=None, help="say which configs run on this device")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--totals-only", action="store_true", help="only the per-component totals")
    return p


def _report(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="write a self-contained HTML report of a search")
    p.add_argument("--out", default=None, help="the search's --out folder")
    p.add_argument("--storage", default=None, help="or an Optuna storage URL ...")
    p.add_argument("--study", default=None, help="... and the study name")
    p.add_argument("--artifacts", default=None,
                   help="artifact folder or s3:// / gs:// location (default OUT/artifacts, or the "
                        "bucket the study records)")
    p.add_argument("--html", default=None, help="where the report goes (default OUT/report.html)")
    return p
