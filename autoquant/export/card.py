"""The model card every export writes: ``README.md`` with the YAML front matter the Hugging Face
hub reads (``base_model``, ``library_name``, ``tags``, the base model's ``license`` when its card
gives one), the plan as a table per block (types, bytes, bits per weight, full-precision share),
the fidelity measured on held-out prompts with the command that measured it, a picture of the
bit map, a reference-vs-quantized image grid and the exact load snippet of its format.

Everything in the card that came from a file (layer names, labels, the base card's licence) is
data: the licence is kept only if it is a plain short token, names are escaped for Markdown
tables, and the YAML is written by ``yaml.safe_dump``.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from .. import __version__, _atomic
from ..models.inventory import inventory
from ..plans.recipe import Recipe

CARD = "README.md"
BITMAP = "bitmap.png"
GRID = "images.png"
MARK = "<!-- written by autoquant export -->"
_LICENSE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}")


def _block(path: str) -> str:
    """``transformer_blocks.3.attn.to_q`` -> ``transformer_blocks.3``; others: their first name."""
    m = re.match(r"(.*?\.\d+)\.", path)
    return m.group(1) if m else path.split(".")[0]


def _cell(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;") \
        .replace("\n", " ")


def plan_rows(pipe: Any, recipe: Recipe) -> tuple[list[dict], dict]:
    """One row per block of the quantized components (layers, types, bytes, bits per weight)
    and the totals (bytes of those components, bits per weight, full-precision share)."""
    inv = inventory(pipe)
    plan = recipe.resolve(inv)
    comps = sorted({l.component for l, _ in plan.items()}) or [l.component for l in inv][:1]
    rows: dict[str, dict] = {}
    for layer in inv:
        if layer.component not in comps:
            continue
        cfg = plan.configs.get(layer.name)
        label = cfg.label if cfg is not None else "full precision"
        nbytes = layer.nbytes(cfg) if cfg is not None else layer.bytes
        key = f"{layer.component}.{_block(layer.path)}" if layer.component else _block(layer.path)
        row = rows.setdefault(key, {"block": key, "layers": 0, "types": Counter(), "bytes": 0,
                                    "weights": 0})
        row["layers"] += 1
        row["types"][label] += 1
        row["bytes"] += nbytes
        row["weights"] += layer.weight_params
    out = []
    for row in rows.values():
        out.append({**row, "types": dict(row["types"]),
                    "bits_per_weight": 8 * row["bytes"] / max(row["weights"], 1)})
    linear = plan.linear_bytes(comps)
    weights = sum(l.weight_params for l in inv if l.component in comps)
    return out, {"components": comps, "bytes": plan.nbytes(comps), "linear_bytes": linear,
                 "bits_per_weight": 8 * linear / max(weights, 1),
                 "fp_share": plan.fp_share(comps)}


def bitmap_png(pipe: Any, recipe: Recipe, path: Path) -> None:
    """Bits per weight of every Linear (rows: blocks; columns: the layer inside its block)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    inv = inventory(pipe)
    plan = recipe.resolve(inv)
    comps = {l.component for l, _ in plan.items()}
    layers = [l for l in inv if l.component in comps]
    rows, cols = [], []
    cells = {}
    for l in layers:
        b = _block(l.path)
        c = l.path[len(b) + 1:] if l.path.startswith(b + ".") else l.path
        if b not in rows:
            rows.append(b)
        if c not in cols:
            cols.append(c)
        cells[l.name] = (rows.index(b), cols.index(c))
    grid = np.full((len(rows), len(cols)), np.nan)
    for l in layers:
        cfg = plan.configs.get(l.name)
        nbytes = l.nbytes(cfg) if cfg is not None else l.bytes
        grid[cells[l.name]] = 8 * nbytes / max(l.weight_params, 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(cols) + 3), max(3, 0.3 * len(rows) + 2)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=1, vmax=16)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=90)
    fig.colorbar(im, ax=ax, label="bits per weight (scales included)")
    ax.set_title("bits per layer")
    fig.tight_layout()
    with _atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def grid_png(references: torch.Tensor, images: torch.Tensor, path: Path, n: int = 8) -> None:
    """Full-precision references (top row) over the exported model's images (bottom row)."""
    import torchvision

    k = min(n, len(images))
    both = torch.cat([references[:k].float().cpu(), images[:k].float().cpu()])
    if both.shape[-1] < 128:  # small images (the demos' 32 px): enlarged, pixels kept sharp
        factor = 128 // both.shape[-1]
        both = torch.nn.functional.interpolate(both, scale_factor=factor, mode="nearest")
    with _atomic.atomic_path(path) as tmp:
        torchvision.utils.save_image(both, tmp, nrow=k, padding=1, format="png")


def base_license(model_id: str | None) -> str | None:
    """The ``license`` of the base model's own card: a local folder's ``README.md``, or the hub
    cache's copy (no network). Kept only if it is a plain short token."""
    import yaml

    if not model_id:
        return None
    candidates = [Path(model_id) / CARD]
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, CARD)
        if isinstance(cached, str):
            candidates.append(Path(cached))
    except Exception:  # noqa: BLE001 -- not a hub id, or no hub library: no licence to copy
        pass
    for card in candidates:
        try:
            text = card.read_text(encoding="utf-8")[:65536]
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        m = re.match(r"---\n(.*?)\n---", text, re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else None
        except yaml.YAMLError:
            meta = None
        lic = meta.get("license") if isinstance(meta, dict) else None
        if isinstance(lic, str) and _LICENSE.fullmatch(lic):
            return lic
    return None


def card_beside(file: str | Path) -> Path | None:
    """The card of a single-file export: ``README.md`` of its folder, or None where that folder
    has a README.md autoquant did not write (a user's own is never replaced)."""
    card = Path(file).resolve().parent / CARD
    if card.exists() and MARK not in card.read_text(encoding="utf-8", errors="replace")[:8192]:
        return None
    return card


def write_card(folder: Path, pipe: Any, recipe: Recipe, *, library: str, fmt: str,
               snippet: str, fidelity: dict | None = None, command: str | None = None,
               images: tuple[torch.Tensor, torch.Tensor] | None = None,
               name: str = CARD, with_recipe: bool = True,
               requires: str | None = None, near: int = 0) -> Path:
    """Write the card (and its pictures) into ``folder``; returns the card's path."""
    import yaml

    from ..models.source import source_of

    source = source_of(pipe)
    model_id = (recipe.model or {}).get("id") or (source.id if source else None)
    rows, total = plan_rows(pipe, recipe)
    methods = sorted({cfg.method for _, cfg in recipe.resolve(inventory(pipe)).items()
                      if not cfg.full_precision})
    front: dict[str, Any] = {}
    if model_id:
        front["base_model"] = str(model_id)
    front["library_name"] = library
    front["tags"] = ["autoquant", "quantized", fmt, *methods]
    lic = base_license(model_id)
    if lic:
        front["license"] = lic
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", MARK, "",
             f"# {_cell(Path(str(model_id)).name if model_id else 'model')}, quantized by "
             f"autoquant", "",
             f"A per-layer plan found by [autoquant](https://pypi.org/project/autoquant/) "
             f"{__version__}, written as **{fmt}**: " + (
                 "the file holds exactly the weights that were scored." if not near else
                 f"{near} layer(s) are held near-exactly (the same codes, their scales "
                 f"re-expressed in the format's layout); the fidelity below is measured on "
                 f"the file itself."), "", "## Load it", "",
             *([f"Needs **{_cell(requires)}**.", ""] if requires else []),
             "```python", snippet.strip(), "```", "",
             "## The plan", "",
             f"{', '.join(total['components'])}: **{total['bytes'] / 2**20:.2f} MiB**, "
             f"**{total['bits_per_weight']:.2f} bits per weight** in its Linear layers "
             f"(every scale and zero point counted), **{100 * total['fp_share']:.1f}%** of the "
             f"weights in full precision.", "",
             "| block | layers | types | MiB | bits per weight |", "|---|---|---|---|---|"]
    for r in rows:
        types = ", ".join(f"{n} {t}" for t, n in sorted(r["types"].items(), key=lambda x: -x[1]))
        lines.append(f"| {_cell(r['block'])} | {r['layers']} | {_cell(types)} | "
                     f"{r['bytes'] / 2**20:.3f} | {r['bits_per_weight']:.2f} |")
    bitmap_png(pipe, recipe, folder / BITMAP)
    lines += ["", f"![bits per layer]({BITMAP})", "", "## Fidelity (held-out prompts)", ""]
    if fidelity:
        m = fidelity
        lines += ["| PSNR (dB) | worst PSNR | SSIM | CLIP fidelity | images |",
                  "|---|---|---|---|---|",
                  f"| {m.get('psnr', float('nan')):.2f} | {m.get('psnr_worst', float('nan')):.2f}"
                  f" | {m.get('ssim', float('nan')):.4f} | "
                  f"{m.get('clip_fidelity', float('nan')):.4f} | {m.get('images', '-')} |", "",
                  "Against the full-precision model's images of the same prompts and seeds, with "
                  "the exported file loaded by its consumer's own code. Measured with:", "",
                  "```", command or "", "```"]
    else:
        lines += ["Not measured at export. Measure it with:", "", "```", command or "", "```"]
    if images is not None:
        grid_png(*images, folder / GRID)
        lines += ["", "Full precision (top) and this export (bottom):", "",
                  f"![reference vs quantized]({GRID})"]
    lines += ["", "## The recipe", ""]
    lines.append("`recipe.yaml` beside this card is the plan (autoquant apply / export read it)."
                 if with_recipe else "The file's `autoquant.recipe` metadata holds the plan.")
    path = folder / name
    _atomic.write_text(path, "\n".join(lines) + "\n")
    if with_recipe:
        _atomic.write_text(folder / "recipe.yaml", recipe.to_yaml())
    return path


__all__ = ["write_card", "card_beside", "plan_rows", "base_license", "CARD", "MARK"]
