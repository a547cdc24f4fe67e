"""Making images: a pipeline, evaluation settings and (prompt, seed) pairs in, images in [0, 1]
out. Scoring's lowest layer -- calibration and the evaluator both generate through here."""

from __future__ import annotations

from typing import Any

import torch

from .._errors import AutoquantError, InputError
from .._progress import tqdm
from .._quiet import quietly
from .settings import EvalSettings, noise_seed


def generate_images(pipe: Any, settings: EvalSettings, pairs: list[tuple[str, int]],
                    progress: bool = False, desc: str = "generating") -> torch.Tensor:
    """Images in [0, 1], ``[N, 3, H, W]`` on the CPU, made in batches of ``settings.batch_size``;
    each with its own CPU generator, seeded with :func:`~autoquant.generation.settings.noise_seed` of its
    prompt and seed (its noise does not depend on its batch nor on the device, and no two prompts
    share a starting latent). The pixels can still depend on the batch (batched matmuls reduce
    in another order at another batch size): the evaluator makes references and candidates in
    the same batches (:func:`batches`)."""
    return _generate(pipe, settings, [[pairs[i] for i in b]
                                      for b in batches(len(pairs), settings.batch_size)],
                     progress, desc)


def _generate(pipe: Any, settings: EvalSettings, chunks: list[list[tuple[str, int]]],
              progress: bool = False, desc: str = "generating") -> torch.Tensor:
    out = []
    kwargs = settings.pipeline_kwargs()
    for chunk in tqdm(chunks, desc=desc, unit="batch", disable=not progress, leave=False):
        gens = [torch.Generator("cpu").manual_seed(noise_seed(p, seed)) for p, seed in chunk]
        try:
            with quietly():  # kernels that load on first use (bitsandbytes' CPU ones) chatter
                images = pipe([p for p, _ in chunk], generator=gens, output_type="pt",
                              **kwargs).images
        except ValueError as e:  # diffusers' check_inputs: a size or setting it cannot make
            raise InputError(f"{type(pipe).__name__} refused these settings ({kwargs}): "
                             f"{str(e).strip().splitlines()[0]}") from None
        if not torch.is_tensor(images):
            raise AutoquantError(f"{type(pipe).__name__} did not return tensors for output_type='pt'")
        want = (settings.height, settings.width)
        if settings.height and tuple(images.shape[-2:]) != want:
            # e.g. Flux rounds a side to a multiple of 16 (with a log line): an image of another
            # size than asked would never match its reference
            raise InputError(f"{type(pipe).__name__} made {images.shape[-2]}x{images.shape[-1]} "
                             f"images when asked for {want[0]}x{want[1]}: pick a size it makes "
                             f"as asked (a multiple of 16 fits every pipeline autoquant knows)")
        out.append(images.float().cpu())
    return torch.cat(out)


def batches(n: int, batch_size: int, boundaries: tuple[int, ...] = ()) -> list[list[int]]:
    """The batches (lists of indices into the pairs) in which an evaluator makes all its images:
    runs of ``batch_size`` within each segment between ``boundaries`` (the search scores a first
    stage of k images, then the rest: references are made with the same cut)."""
    cuts = [0, *sorted({b for b in boundaries if 0 < b < n}), n]
    return [list(range(i, min(i + batch_size, hi)))
            for lo, hi in zip(cuts, cuts[1:]) for i in range(lo, hi, batch_size)]
