"""Train the Flux demo (``demo-flux``): its 16-channel VAE and its Flux transformer, on
Fashion-MNIST, the way the first demo was trained. Seeded; three steps.

    # 1. on any machine with the MiniLM package: the captions as FluxPipeline encodes them
    python -m autoquant.models.zoo.train_flux prepare --out flux_text.pt
    # 2. on a GPU (the H100, through the device tool): train, time-boxed per stage
    python -m autoquant.models.zoo.train_flux train --text-cache flux_text.pt --data FMNIST_DIR --out OUT
    # 3. install the result as the package's Flux demo weights (bf16 safetensors)
    python -m autoquant.models.zoo.train_flux install --trained OUT

The same data, captions, seeded loop and time boxes as ``train_demo``; the CLIP and the
classifier that grade its images are the first demo's (same images, same domain). The
denoiser is trained by rectified flow as Flux is: ``x_t = (1 - s) x_0 + s noise``, target
``noise - x_0``, ``s`` logit-normal and shifted by the same ``mu`` the pipeline's scheduler
uses for 16 image tokens, 10% of captions dropped to the empty prompt for guidance.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import captions as C
from . import flux as X
from . import models as M
from .data import brightness_terciles, load_split, to_pixels
from .train_demo import Log, _autocast, fit, run_script, seed_all, train_vae


@torch.no_grad()
def encode_like_flux(captions: list[str], tokenizer, encoder, batch: int = 256):
    """``(states [N, 16, 384], pooled [N, 384])`` exactly as ``FluxPipeline`` computes them with
    MiniLM in both roles: padded to 16 tokens, no attention mask, ``[0]`` and ``pooler_output``."""
    states, pooled = [], []
    for i in range(0, len(captions), batch):
        ids = tokenizer(captions[i:i + batch], padding="max_length", max_length=X.TEXT_TOKENS,
                        truncation=True, return_tensors="pt").input_ids
        out = encoder(ids, output_hidden_states=False)
        states.append(out[0].float())
        pooled.append(out.pooler_output.float())
    return torch.cat(states), torch.cat(pooled)


def prepare(out: Path) -> None:
    captions = C.all_training_captions() + [""]  # the last row: the empty (negative) prompt
    tok, enc = M.load_text_encoder()
    states, pooled = encode_like_flux(captions, tok, enc)
    index = {}
    for label in range(len(C.CLASSES)):
        for tercile in (0, 1, 2):
            index[f"{label}/{tercile}"] = [captions.index(c) for c in C.captions_for(label, tercile)]
    torch.save({"captions": captions, "states": states.half(), "pooled": pooled.half(),
                "index": index}, out)
    print(f"{len(captions)} captions -> {out} ({out.stat().st_size / 2**20:.1f} MiB)")


def shifted_sigmas(n: int, device, mu: float) -> torch.Tensor:
    """Logit-normal sigmas, time-shifted by ``mu`` as the scheduler shifts its steps."""
    s = torch.sigmoid(torch.randn(n, device=device))
    return math.exp(mu) / (math.exp(mu) + (1 / s.clamp(1e-4, 1 - 1e-4) - 1))


def train_denoiser(lat_mean, lat_std, labels, terciles, cache, device, seconds, steps, log,
                   bs=512):
    from diffusers import FluxPipeline

    model = X.build_transformer().to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    states, pooled = cache["states"].to(device).float(), cache["pooled"].to(device).float()
    groups = torch.full((len(C.CLASSES), 3, 64), -1, dtype=torch.long)
    for key, idx in cache["index"].items():
        label, tercile = map(int, key.split("/"))
        groups[label, tercile, :len(idx)] = torch.tensor(idx)
    counts = (groups >= 0).sum(-1).to(device)
    groups = groups.to(device)
    uncond = len(cache["captions"]) - 1
    _, c, h, w = lat_mean.shape
    tokens = (h // 2) * (w // 2)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, torch.float32)
    txt_ids = torch.zeros(X.TEXT_TOKENS, 3, device=device)
    cfg = X.SCHEDULER_CONFIG
    slope = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"]
                                                       - cfg["base_image_seq_len"])
    mu = cfg["base_shift"] + slope * (tokens - cfg["base_image_seq_len"])
    losses = []

    def loss_at(_step):
        i = torch.randint(0, len(lat_mean), (bs,), device=device)
        x0 = lat_mean[i] + lat_std[i] * torch.randn_like(lat_mean[i])
        x0 = FluxPipeline._pack_latents(x0, bs, c, h, w)
        lab, ter = labels[i], terciles[i]
        pick = (torch.rand(bs, device=device) * counts[lab, ter]).long()
        cap = groups[lab, ter, pick]
        cap = torch.where(torch.rand(bs, device=device) < 0.1, torch.full_like(cap, uncond), cap)
        s = shifted_sigmas(bs, device, mu)
        noise = torch.randn_like(x0)
        xt = (1 - s)[:, None, None] * x0 + s[:, None, None] * noise
        with _autocast(device):
            pred = model(hidden_states=xt, timestep=s, pooled_projections=pooled[cap],
                         encoder_hidden_states=states[cap], txt_ids=txt_ids, img_ids=img_ids,
                         return_dict=False)[0]
        return F.mse_loss(pred.float(), noise - x0)

    @torch.no_grad()
    def ema_update(step, loss):
        decay = min(0.999, (1 + step) / (10 + step))
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)
        if step % 50 == 0:
            losses.append(loss.item())

    step, _, took = fit(model.parameters(), 3e-4, 0.01, steps, seconds, loss_at, warmup=500,
                        clip_grad=1.0, after=ema_update)
    log.stage("denoiser", steps=step, seconds=round(took, 1), batch=bs, mu=mu,
              final_loss=sum(losses[-20:]) / max(1, len(losses[-20:])), loss_curve=losses)
    return ema


def train(args) -> None:
    seed_all(args.seed)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = torch.load(args.text_cache, weights_only=True)
    images, labels = load_split("train", args.data)
    test_images, _ = load_split("test", args.data)
    if args.smoke:
        images, labels, test_images = images[:512], labels[:512], test_images[:256]
    terciles = brightness_terciles(images).to(device)
    pixels, labels = to_pixels(images).to(device), labels.to(device)
    test_pixels = to_pixels(test_images).to(device)
    log = Log()
    log.stage("setup", device=str(device),
              gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              torch=torch.__version__, seed=args.seed, train_images=len(images))
    t0 = time.time()
    s = args.scale
    vae, lat_mean, lat_std = train_vae(pixels, test_pixels, device, 70 * s, 8000, log,
                                       build=X.build_vae, shift=True, bs=args.vae_batch)
    vae.to(torch.bfloat16).save_pretrained(out / "vae")
    ema = train_denoiser(lat_mean, lat_std, labels, terciles, cache, device,
                         args.denoiser_seconds or 300 * s, 40000, log, bs=args.batch)
    ema.to(torch.bfloat16).save_pretrained(out / "transformer")
    log.stage("total", seconds=round(time.time() - t0, 1))
    (out / "train_log.json").write_text(json.dumps(log.data, indent=1))


def install(trained: Path, target: Path) -> None:
    """Copy trained weights into the package's Flux demo folder (diffusers layout, bf16)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    target.mkdir(parents=True, exist_ok=True)
    for sub in ("transformer", "vae"):
        (target / sub).mkdir(exist_ok=True)
        for f in ("config.json", "diffusion_pytorch_model.safetensors"):
            shutil.copy(trained / sub / f, target / sub / f)
    shutil.copy(trained / "train_log.json", target / "train_log.json")
    FlowMatchEulerDiscreteScheduler(**X.SCHEDULER_CONFIG).save_config(target / "scheduler")
    print(f"installed into {target}")


def _train_options(p) -> None:
    p.add_argument("--batch", type=int, default=512, help="the denoiser's batch")
    p.add_argument("--vae-batch", type=int, default=256, help="the VAE's batch")
    p.add_argument("--denoiser-seconds", type=float, default=None,
                   help="the denoiser's time box (default 300 s x --scale)")


def main(argv=None) -> int:
    return run_script(argv, "python -m autoquant.models.zoo.train_flux", prepare, train, install,
                      "flux_text.pt", X.FLUX_DIR, _train_options)


if __name__ == "__main__":
    sys.exit(main())
