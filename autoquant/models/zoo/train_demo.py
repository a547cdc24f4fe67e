"""Train the demo model: VAE, denoiser, CLIP and classifier on Fashion-MNIST. Seeded; one command.

    # 1. on any machine with the MiniLM package: encode the training captions once
    python -m autoquant.models.zoo.train_demo prepare --out text_cache.pt
    # 2. on a GPU (the H100, through the device tool): train everything, time-boxed per stage
    python -m autoquant.models.zoo.train_demo train --text-cache text_cache.pt --data FMNIST_DIR --out OUT
    # 3. install the result as the package's demo weights (fp16 safetensors)
    python -m autoquant.models.zoo.train_demo install --trained OUT

Data: Fashion-MNIST, Debian package ``dataset-fashion-mnist`` (Zalando Research, MIT licence),
60k training images; the 10k test images are used only for the measurements.
The text encoder (all-MiniLM-L6-v2) is frozen, so its caption states are computed once (step 1)
and the GPU never needs its weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import captions as C
from . import models as M
from .data import brightness_terciles, load_split, to_pixels


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


# ---------------------------------------------------------------------------------------------
def prepare(out: Path) -> None:
    captions = C.all_training_captions() + [""]  # the last row: the unconditional (empty) prompt
    tok, enc = M.load_text_encoder()
    states, masks, pooled = M.encode_captions(captions, tok, enc)
    index = {}
    for label in range(len(C.CLASSES)):
        for tercile in (0, 1, 2):
            index[f"{label}/{tercile}"] = [captions.index(c) for c in C.captions_for(label, tercile)]
    torch.save({"captions": captions, "states": states.half(), "masks": masks.bool(),
                "pooled": pooled.float(), "index": index,
                "class_prompts": [captions.index(p) for p in C.class_prompts()]}, out)
    print(f"{len(captions)} captions -> {out} ({out.stat().st_size / 2**20:.1f} MiB)")


# ---------------------------------------------------------------------------------------------
class Log:
    def __init__(self):
        self.data: dict = {}

    def stage(self, name: str, **values):
        self.data.setdefault(name, {}).update(values)
        print(name, json.dumps({k: v for k, v in values.items() if not isinstance(v, list)}),
              flush=True)


def cosine_lr(opt, step: int, total: int, base: float, warmup: int = 200) -> None:
    lr = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / total, 1)))
    for g in opt.param_groups:
        g["lr"] = lr


def fit(params, lr: float, weight_decay: float, steps: int, seconds: float, loss_at,
        warmup: int = 200, clip_grad: float | None = None, after=None):
    """The one training loop of every stage: AdamW with warm-up and cosine decay, at most
    ``steps`` steps and ``seconds`` seconds. ``loss_at(step)`` returns the step's loss;
    ``after(step, loss)`` runs after each update. Returns ``(steps run, last loss, seconds)``."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    start, step, loss = time.time(), 0, None
    while step < steps and time.time() - start < seconds:
        cosine_lr(opt, step, steps, lr, warmup)
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        opt.step()
        if after is not None:
            after(step, loss)
        step += 1
    return step, loss, time.time() - start


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 px (the padding is background)."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    dx, dy = random.randint(-2, 2), random.randint(-2, 2)
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_vae(pixels, test_pixels, device, seconds, steps, log, build=None, shift=False, bs=256):
    """A VAE (``build()``, default the demo's) trained to reconstruct; its latents scaled to unit
    std (``scaling_factor``) and, with ``shift``, centred (``shift_factor``, as Flux decodes
    ``latents / scaling_factor + shift_factor``). Returns the VAE and the scaled posterior's
    means and stds of ``pixels``."""
    vae = (build or M.build_vae)().to(device).train()

    def loss_at(_step):
        x = pixels[torch.randint(0, len(pixels), (bs,), device=device)]
        with _autocast(device):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        return F.l1_loss(rec.float(), x) + F.mse_loss(rec.float(), x) + 1e-4 * kl

    step, loss, took = fit(vae.parameters(), 1e-3, 0.0, steps, seconds, loss_at)
    vae.eval()
    with torch.no_grad():
        mean, std = [], []
        for i in range(0, len(pixels), 1000):
            d = vae.encode(pixels[i:i + 1000]).latent_dist
            mean.append(d.mean)
            std.append(d.std)
        mean, std = torch.cat(mean), torch.cat(std)
        rec = vae.decode(vae.encode(test_pixels[:2000]).latent_dist.mean).sample.clamp(-1, 1)
        mse = F.mse_loss((rec + 1) / 2, (test_pixels[:2000] + 1) / 2).item()
    offset = mean.mean().item() if shift else 0.0
    scaling = (1.0 / (mean - offset).std()).item()
    config = {"scaling_factor": scaling, **({"shift_factor": offset} if shift else {})}
    vae.register_to_config(**config)
    log.stage("vae", steps=step, seconds=round(took, 1), final_loss=loss.item(),
              test_psnr=10 * math.log10(1 / mse), **config)
    return vae, (mean - offset) * scaling, std * scaling


def train_denoiser(lat_mean, lat_std, labels, terciles, cache, device, seconds, steps, log):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**M.SCHEDULER_CONFIG)
    alphas = sched.alphas_cumprod.to(device)
    model = M.build_transformer().to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    states, masks = cache["states"].to(device), cache["masks"].to(device)
    groups = torch.full((len(C.CLASSES), 3, 64), -1, dtype=torch.long)
    for key, idx in cache["index"].items():
        label, tercile = map(int, key.split("/"))
        groups[label, tercile, :len(idx)] = torch.tensor(idx)
    counts = (groups >= 0).sum(-1).to(device)
    groups = groups.to(device)
    uncond = len(cache["captions"]) - 1
    bs, losses = 512, []
    cond = {"resolution": None, "aspect_ratio": None}

    def loss_at(_step):
        i = torch.randint(0, len(lat_mean), (bs,), device=device)
        x0 = lat_mean[i] + lat_std[i] * torch.randn_like(lat_mean[i])
        lab, ter = labels[i], terciles[i]
        pick = (torch.rand(bs, device=device) * counts[lab, ter]).long()
        cap = groups[lab, ter, pick]
        cap = torch.where(torch.rand(bs, device=device) < 0.1, torch.full_like(cap, uncond), cap)
        t = torch.randint(0, 1000, (bs,), device=device)
        noise = torch.randn_like(x0)
        a = alphas[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with _autocast(device):
            pred = model(xt, encoder_hidden_states=states[cap].float(),
                         encoder_attention_mask=masks[cap].long(), timestep=t,
                         added_cond_kwargs=cond).sample
        return F.mse_loss(pred.float(), noise)

    @torch.no_grad()
    def ema_update(step, loss):
        decay = min(0.999, (1 + step) / (10 + step))
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)
        if step % 50 == 0:
            losses.append(loss.item())

    step, _, took = fit(model.parameters(), 3e-4, 0.01, steps, seconds, loss_at, warmup=500,
                        clip_grad=1.0, after=ema_update)
    log.stage("denoiser", steps=step, seconds=round(took, 1), batch=bs,
              final_loss=sum(losses[-20:]) / max(1, len(losses[-20:])), loss_curve=losses)
    return ema


def soft_clip_loss(img, txt, labels, scale):
    """CLIP's symmetric loss with every same-class pair a positive (captions repeat per class)."""
    logits = scale * img @ txt.t()
    target = (labels[:, None] == labels[None, :]).float()
    target = target / target.sum(1, keepdim=True)
    return 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean()
                  - (target * logits.t().log_softmax(1)).sum(1).mean())


def train_clip(pixels, labels, terciles, cache, test_pixels, test_labels, device, seconds, steps,
               log):
    clip = M.DemoCLIP().to(device).train()
    pooled = cache["pooled"].to(device)
    groups = [[cache["index"][f"{l}/{t}"] for t in range(3)] for l in range(len(C.CLASSES))]
    bs = 512

    def loss_at(_step):
        i = torch.randint(0, len(pixels), (bs,), device=device)
        cap = torch.tensor([random.choice(groups[l][t]) for l, t in
                            zip(labels[i].tolist(), terciles[i].tolist())], device=device)
        with _autocast(device):
            img = clip.encode_image(augment(pixels[i]), normalize=True)
            txt = clip.encode_text_embeddings(pooled[cap], normalize=True)
        return soft_clip_loss(img.float(), txt.float(), labels[i],
                              clip.logit_scale.exp().clamp(max=100))

    step, loss, took = fit(clip.parameters(), 1e-3, 0.05, steps, seconds, loss_at)
    clip.eval()
    with torch.no_grad():
        txt = clip.encode_text_embeddings(pooled[cache["class_prompts"]], normalize=True)
        pred = torch.cat([(clip.encode_image(test_pixels[j:j + 1000], normalize=True) @ txt.t())
                          .argmax(1) for j in range(0, len(test_pixels), 1000)])
    log.stage("clip", steps=step, seconds=round(took, 1), final_loss=loss.item(),
              zero_shot_test_accuracy=(pred == test_labels).float().mean().item())
    return clip


def train_classifier(pixels, labels, test_pixels, test_labels, device, seconds, steps, log):
    net = M.Classifier().to(device).train()
    bs = 256

    def loss_at(_step):
        i = torch.randint(0, len(pixels), (bs,), device=device)
        with _autocast(device):
            return F.cross_entropy(net(augment(pixels[i])).float(), labels[i],
                                   label_smoothing=0.1)

    step, loss, took = fit(net.parameters(), 2e-3, 0.05, steps, seconds, loss_at)
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(test_pixels[j:j + 1000]).argmax(1)
                          for j in range(0, len(test_pixels), 1000)])
    log.stage("classifier", steps=step, seconds=round(took, 1),
              final_loss=loss.item(), test_accuracy=(pred == test_labels).float().mean().item())
    return net


def train(args) -> None:
    from safetensors.torch import save_file

    seed_all(args.seed)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = torch.load(args.text_cache, weights_only=True)
    images, labels = load_split("train", args.data)
    test_images, test_labels = load_split("test", args.data)
    if args.smoke:
        images, labels, test_images, test_labels = images[:512], labels[:512], test_images[:256], test_labels[:256]
    terciles = brightness_terciles(images).to(device)
    pixels, labels = to_pixels(images).to(device), labels.to(device)
    test_pixels, test_labels = to_pixels(test_images).to(device), test_labels.to(device)
    log = Log()
    log.stage("setup", device=str(device), gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              torch=torch.__version__, seed=args.seed, train_images=len(images))
    t0 = time.time()
    s = args.scale
    classifier = train_classifier(pixels, labels, test_pixels, test_labels, device, 45 * s, 6000, log)
    save_file({k: v.half().contiguous() for k, v in classifier.state_dict().items()}, str(out / "classifier.safetensors"))
    clip = train_clip(pixels, labels, terciles, cache, test_pixels, test_labels, device, 75 * s, 8000, log)
    save_file({k: v.half().contiguous() for k, v in clip.state_dict().items()}, str(out / "clip.safetensors"))
    vae, lat_mean, lat_std = train_vae(pixels, test_pixels, device, 70 * s, 8000, log)
    vae.to(torch.float16).save_pretrained(out / "vae")
    ema = train_denoiser(lat_mean, lat_std, labels, terciles, cache, device, 280 * s, 40000, log)
    ema.to(torch.float16).save_pretrained(out / "transformer")
    log.stage("total", seconds=round(time.time() - t0, 1))
    (out / "train_log.json").write_text(json.dumps(log.data, indent=1))


# ---------------------------------------------------------------------------------------------
def install(trained: Path, target: Path) -> None:
    """Copy trained weights into the package's demo folder (diffusers layout, fp16)."""
    target.mkdir(parents=True, exist_ok=True)
    for sub in ("transformer", "vae"):
        (target / sub).mkdir(exist_ok=True)
        for f in ("config.json", "diffusion_pytorch_model.safetensors"):
            shutil.copy(trained / sub / f, target / sub / f)
    for f in ("clip.safetensors", "classifier.safetensors", "train_log.json"):
        shutil.copy(trained / f, target / f)
    print(f"installed into {target}")


def run_script(argv, prog: str, prepare, train, install, text_cache: str, target: Path,
               train_options=None) -> int:
    """The three-step command line every demo's training script has: ``prepare`` (caption
    states, CPU), ``train`` (time-boxed stages), ``install`` (into the package).
    ``train_options(parser)`` adds a script's own training flags."""
    ap = argparse.ArgumentParser(prog=prog)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", default=text_cache)
    p = sub.add_parser("train")
    p.add_argument("--text-cache", required=True)
    p.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX .gz files")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every stage's time box")
    p.add_argument("--smoke", action="store_true", help="tiny data, for a quick check")
    if train_options is not None:
        train_options(p)
    p = sub.add_parser("install")
    p.add_argument("--trained", required=True)
    p.add_argument("--target", default=str(target))
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare(Path(args.out))
    elif args.cmd == "train":
        train(args)
    else:
        install(Path(args.trained), Path(args.target))
    return 0


def main(argv=None) -> int:
    return run_script(argv, "python -m autoquant.models.zoo.train_demo", prepare, train, install,
                      "text_cache.pt", Path(__file__).parent / "demo")


if __name__ == "__main__":
    sys.exit(main())
