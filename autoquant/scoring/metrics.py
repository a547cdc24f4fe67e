"""Fidelity of images against their full-precision references, per image, computed in batches."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import (peak_signal_noise_ratio,
                                           structural_similarity_index_measure)

#: per metric: is higher better (for "worst" = min) -- the aggregation direction
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "clip_fidelity": True, "clip_score": True,
                    "clip_score_delta": True}


def pixel_metrics(images: torch.Tensor, refs: torch.Tensor, batch: int = 64) -> dict:
    """PSNR (dB, data range 1) and SSIM per image; identical images give PSNR inf."""
    psnr, ssim = [], []
    for i in range(0, len(images), batch):
        a, b = images[i:i + batch].float(), refs[i:i + batch].float()
        psnr.append(peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none",
                                            dim=(1, 2, 3)).reshape(-1))
        ssim.append(structural_similarity_index_measure(a, b, data_range=1.0,
                                                        reduction="none").reshape(-1))
    return {"psnr": torch.cat(psnr), "ssim": torch.cat(ssim)}


def clip_features(clip, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([clip.image_features(images[i:i + batch]).cpu()
                      for i in range(0, len(images), batch)])


def clip_metrics(image_feats: torch.Tensor, ref_feats: torch.Tensor,
                 text_feats: torch.Tensor) -> dict:
    """CLIP fidelity = cos(image, reference image); CLIP score = 100 * cos(image, prompt), and its
    change against the reference's score."""
    score = 100 * (image_feats * text_feats).sum(-1)
    ref_score = 100 * (ref_feats * text_feats).sum(-1)
    return {"clip_fidelity": (image_feats * ref_feats).sum(-1), "clip_score": score,
            "clip_score_delta": score - ref_score}


def aggregate(per_image: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    out = {}
    for name, values in per_image.items():
        v = values.double()
        worst = v.min() if HIGHER_IS_BETTER.get(name, True) else v.max()
        out[name] = {"mean": v.mean().item(), "worst": worst.item()}
    return out
