"""Rebuild the transfer-quality testbed shipped in ``diffusers_lorax/quality/assets`` (see docs/quality.md).

    pip install scikit-learn && python benchmarks/quality/build.py [--out DIR] [--scale 1.0]

Deterministic (every step seeded; run on 2 CPU threads as shipped) and about half an hour on two CPU cores.
What it trains, in order, on scikit-learn's 1 797 handwritten digits at 16×16 (``quality/data.py``):

1. VAE: an ``AutoencoderKL`` (16×16×3 → 8×8×4) on digits in all four looks; its ``scaling_factor`` is set to
   1 / std of the latents, as Stable Diffusion's was.
2. ``source``: a ``CLIPTextModel`` and a ``UNet2DConditionModel`` trained together from scratch on plain digits with
   prompts "a handwritten digit <word>" (10 % empty prompts, for classifier-free guidance).
3. ``target-finetune``: the source UNet fine-tuned on thick-stroked digits (the text encoder and VAE kept).
4. ``target-distilled``: a UNet with one layer per block instead of two, initialised from the source by name (a
   layer map that keeps the first layers of each block) and distilled from the source UNet as BK-SDM was from
   SD 1.4: task loss + output KD + feature KD on every block's output.
5. ``target-renamed``: the same architecture as ``target-distilled``, initialised as BK-SDM initialises its students
   (``copy_weight_from_teacher``: the student's ``up_blocks.i.{resnets,attentions}.1`` from the teacher's ``….2``,
   the last layer of the up stage, not the middle one; the rest by name) and distilled with the same recipe.
   Copy by name puts the LoRA's ``attentions.1`` on a module that holds the teacher's ``attentions.2``.
6. The style LoRA, one recipe on each of the four models: rank 8, alpha 4, on every attention, feed-forward and
   projection layer of the UNet and on the text encoder's attention; trained on slanted digits with prompts
   "a handwritten digit <word> in lrx style"; saved in kohya format (``lora_unet_…``, ``lora_te_…``, ``.alpha``).
7. Two small CNNs (digit and slant) on real and VAE-reconstructed digits.

Weights are rounded to float16 as soon as a model is trained, and saved in float16 (11 MB in all); the LoRAs are
trained on the rounded models, so the shipped files are exactly what they were trained against.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffusers_lorax import toy
from diffusers_lorax.quality import ASSETS, data
from diffusers_lorax.quality.classifiers import CLASSIFIERS_FILE, SmallCNN, save_scorers

BATCH = 64
STEPS = dict(vae=600, source=2400, finetune=600, distilled=900, lora=500, classifier=600)
LORA_RANK, LORA_ALPHA = 8, 4.0
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
MODELS = ("source", "target-finetune", "target-distilled", "target-renamed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help=f"output folder (default: {ASSETS})")
    parser.add_argument("--resume", action="store_true", help="keep the models already saved in --out")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count (a quick smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    steps = {k: max(2, round(v * args.scale)) for k, v in STEPS.items()}
    started = time.perf_counter()
    build(args.out, steps, args.resume)
    print(f"built {args.out} in {time.perf_counter() - started:.0f} s")


def build(out: Path, steps: dict[str, int], resume: bool = False) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    ink, labels = data.load_digits()
    looks = {
        "plain": ink,
        "thick": data.thicken(ink),
        "slanted": data.slant(ink),
        "thick+slanted": data.slant(data.thicken(ink)),
    }
    if out.exists() and not resume:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    # --resume keeps every model already saved in ``out`` (delete a folder or file to rebuild it and what follows);
    # from the distilled stage on, each stage seeds itself, so a resumed build equals a full one.
    saved = {name: resume and (out / name / "model_index.json").exists() for name in MODELS}
    kept = {name: StableDiffusionPipeline.from_pretrained(out / name, dtype=torch.float32) for name in MODELS
            if saved[name]}
    with tempfile.TemporaryDirectory() as folder:
        vocab = toy.write_tokenizer(folder, data.VOCABULARY, data.MAX_TOKENS)
        tokenizer = CLIPTokenizer.from_pretrained(folder)

    # 1. VAE
    pixels = torch.cat([data.to_pixels(x) for x in looks.values()])
    if "source" in kept:
        vae = kept["source"].vae
    else:
        vae = AutoencoderKL(**data.VAE)
        train_vae(vae, pixels, steps["vae"])
        with torch.no_grad():
            vae.register_to_config(scaling_factor=float(1.0 / vae.encode(pixels).latent_dist.mean.std()))
        round_fp16(vae)
    latents = {name: encode(vae, x) for name, x in looks.items()}

    # 2. source: text encoder and UNet from scratch
    text_config = CLIPTextConfig(
        **data.TEXT_ENCODER,
        vocab_size=len(vocab),
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    captions = Captions(tokenizer, labels)
    scheduler = DDPMScheduler(**data.SCHEDULER)
    if "source" in kept:
        text_encoder, unet = kept["source"].text_encoder, kept["source"].unet
    else:
        text_encoder = CLIPTextModel(text_config)
        unet = UNet2DConditionModel(**data.UNET)
        train_diffusion(unet, text_encoder, latents["plain"], captions, scheduler, steps["source"], lr=1e-3,
                        desc="source", train_text=True)
        round_fp16(unet, text_encoder)
    text_encoder.requires_grad_(False)

    # 3. target-finetune: the source UNet on thick strokes
    if "target-finetune" in kept:
        finetuned = kept["target-finetune"].unet
    else:
        finetuned = UNet2DConditionModel(**data.UNET)
        finetuned.load_state_dict(unet.state_dict())
        train_diffusion(finetuned, text_encoder, latents["thick"], captions, scheduler, steps["finetune"], lr=2e-4,
                        desc="target-finetune")
        round_fp16(finetuned)

    # 4. target-distilled: fewer layers, initialised by name from the source, distilled from it
    if "target-distilled" in kept:
        distilled = kept["target-distilled"].unet
    else:
        torch.manual_seed(6)  # each stage from here on is seeded on its own
        distilled = UNet2DConditionModel(**data.UNET_DISTILLED)
        copied = init_by_name(distilled, unet)
        print(f"target-distilled: {copied} of {len(distilled.state_dict())} tensors initialised from the source")
        distill(distilled, unet, text_encoder, latents["plain"], captions, scheduler, steps["distilled"])
        round_fp16(distilled)

    # 5. target-renamed: the same student, initialised BK-SDM style (up stages keep the teacher's last layer)
    if "target-renamed" in kept:
        renamed = kept["target-renamed"].unet
    else:
        torch.manual_seed(8)
        renamed = UNet2DConditionModel(**data.UNET_DISTILLED)
        copied = init_bksdm(renamed, unet)
        print(f"target-renamed: {copied} of {len(renamed.state_dict())} tensors initialised from the source")
        distill(renamed, unet, text_encoder, latents["plain"], captions, scheduler, steps["distilled"],
                desc="target-renamed")
        round_fp16(renamed)

    sampler = DDIMScheduler(**data.SCHEDULER, set_alpha_to_one=False)
    loras = out / "loras"
    loras.mkdir(exist_ok=True)
    for name, model in zip(MODELS, (unet, finetuned, distilled, renamed)):
        if name not in kept:
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=model, scheduler=sampler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
            pipe.to(torch.float16).save_pretrained(out / name)
            pipe.to(torch.float32)
        # 6. the style LoRA, same recipe (data, seeds, steps) on each model
        if (loras / f"slant-{name}.safetensors").exists() and resume:
            continue
        lora = train_lora(model, text_encoder, latents["slanted"], Captions(tokenizer, labels, styled=True),
                          scheduler, steps["lora"], desc=f"lora on {name}")
        save_kohya(lora, loras / f"slant-{name}.safetensors")

    (out / "build.json").write_text(json.dumps({"steps": steps, "batch": BATCH, "lora_rank": LORA_RANK,
                                                "lora_alpha": LORA_ALPHA}, indent=1))

    # 7. classifiers on real and reconstructed digits in all looks
    if (out / CLASSIFIERS_FILE).exists() and resume:
        return
    with torch.no_grad():
        recon = torch.cat([vae.decode(vae.encode(p).latent_dist.mean).sample for p in pixels.split(512)])
    images = torch.cat([torch.cat(list(looks.values())), data.to_ink((recon.clamp(-1, 1) + 1) / 2)])
    digit_labels = labels.repeat(8)
    slant_labels = torch.tensor([0, 0, 1, 1]).repeat_interleave(len(labels)).repeat(2)
    digit_net, slant_net = SmallCNN(10), SmallCNN(2)
    for net, y, desc in ((digit_net, digit_labels, "digit classifier"), (slant_net, slant_labels, "slant classifier")):
        train_classifier(net, images, y, steps["classifier"], desc)
    save_scorers(digit_net, slant_net, out / CLASSIFIERS_FILE)


class Captions:
    """Token ids of the ten prompts (plain or styled) and of the empty prompt; ``sample`` draws a batch's ids for
    given digit labels, with 10 % empty prompts."""

    def __init__(self, tokenizer, labels: torch.Tensor, styled: bool = False):
        prompts = [data.prompt(d, styled) for d in range(10)] + [""]
        self.ids = tokenizer(prompts, padding="max_length", max_length=data.MAX_TOKENS, return_tensors="pt").input_ids
        self.labels = labels

    def sample(self, index: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        choice = self.labels[index].clone()
        choice[torch.rand(len(index), generator=gen) < 0.1] = 10
        return self.ids[choice]


def train_vae(vae, pixels: torch.Tensor, steps: int) -> None:
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = cosine(opt, steps)
    for _ in tqdm(range(steps), desc="vae"):
        x = pixels[torch.randint(len(pixels), (BATCH,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        loss = F.mse_loss(vae.decode(z).sample, x) + 1e-5 * posterior.kl().mean()
        step(opt, sched, loss)


@torch.no_grad()
def encode(vae, ink: torch.Tensor) -> torch.Tensor:
    return vae.encode(data.to_pixels(ink)).latent_dist.mean * vae.config.scaling_factor


def noisy_batch(latents, captions, scheduler, gen):
    """One training batch, drawn from ``gen`` in a fixed order: latents, prompt ids, noise ε, timesteps t; returns
    ``(ids, noisy latents, ε, t)`` with the noisy latents from the scheduler's forward process."""
    index = torch.randint(len(latents), (BATCH,), generator=gen)
    ids = captions.sample(index, gen)
    x0 = latents[index]
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(scheduler.config.num_train_timesteps, (BATCH,), generator=gen)
    return ids, scheduler.add_noise(x0, noise, t), noise, t


def train_diffusion(unet, text_encoder, latents, captions, scheduler, steps, lr, desc, train_text=False):
    """Noise-prediction training (ε, MSE) with a cosine learning rate."""
    gen = torch.Generator().manual_seed(2)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = cosine(opt, steps)
    for _ in tqdm(range(steps), desc=desc):
        ids, noisy, noise, t = noisy_batch(latents, captions, scheduler, gen)
        with torch.set_grad_enabled(train_text):
            cond = text_encoder(ids).last_hidden_state
        step(opt, sched, F.mse_loss(unet(noisy, t, cond).sample, noise))


def distill(student, teacher, text_encoder, latents, captions, scheduler, steps, desc="target-distilled"):
    """Knowledge distillation as BK-SDM (Kim et al., ECCV 2024): task loss + output KD (MSE to the teacher's noise
    prediction) + feature KD (MSE between the outputs of every down, mid and up block, which keep their shapes when
    layers are removed inside blocks), weights 1, 1, 1."""
    gen = torch.Generator().manual_seed(7)
    opt = torch.optim.AdamW(student.parameters(), lr=5e-4, weight_decay=1e-2)
    sched = cosine(opt, steps)
    features = {id(student): [], id(teacher): []}
    hooks = [
        block.register_forward_hook(lambda mod, args, out, key=id(model): features[key].append(
            out[0] if isinstance(out, tuple) else out))
        for model in (student, teacher)
        for block in [*model.down_blocks, model.mid_block, *model.up_blocks]
    ]
    for _ in tqdm(range(steps), desc=desc):
        ids, noisy, noise, t = noisy_batch(latents, captions, scheduler, gen)
        cond = text_encoder(ids).last_hidden_state
        for f in features.values():
            f.clear()
        with torch.no_grad():
            teacher_out = teacher(noisy, t, cond).sample
        out = student(noisy, t, cond).sample
        feature_kd = sum(F.mse_loss(a, b) for a, b in zip(features[id(student)], features[id(teacher)]))
        step(opt, sched, F.mse_loss(out, noise) + F.mse_loss(out, teacher_out) + feature_kd)
    for hook in hooks:
        hook.remove()


def train_lora(unet, text_encoder, latents, captions, scheduler, steps, desc) -> dict[str, torch.Tensor]:
    """Train one style LoRA (PEFT's ``inject_adapter_in_model``) on copies of the models and return it in PEFT keys with
    alpha/rank folded into ``lora_B`` (``unet.…`` and ``text_encoder.text_model.…``)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    unet, text_encoder = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    torch.manual_seed(3)
    for model, targets in ((unet, UNET_LORA_TARGETS), (text_encoder, TEXT_LORA_TARGETS)):
        config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=targets, init_lora_weights="gaussian")
        inject_adapter_in_model(config, model, adapter_name="style")
    params = [p for m in (unet, text_encoder) for n, p in m.named_parameters() if "lora_" in n]
    for model in (unet, text_encoder):
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    gen = torch.Generator().manual_seed(4)
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    sched = cosine(opt, steps)
    for _ in tqdm(range(steps), desc=desc):
        ids, noisy, noise, t = noisy_batch(latents, captions, scheduler, gen)
        cond = text_encoder(ids).last_hidden_state
        step(opt, sched, F.mse_loss(unet(noisy, t, cond).sample, noise))
    scale = LORA_ALPHA / LORA_RANK
    lora = {}
    # transformers >= 5 names CLIP modules without "text_model."; LoRA files in the wild keep it.
    te_prefix = "text_encoder." + ("" if hasattr(text_encoder, "text_model") else "text_model.")
    for prefix, model in (("unet.", unet), (te_prefix, text_encoder)):
        for key, value in get_peft_model_state_dict(model, adapter_name="style").items():
            value = value.detach().clone()
            lora[prefix + key] = value * scale if ".lora_B." in key else value
    return lora


def save_kohya(lora: dict[str, torch.Tensor], path: Path) -> None:
    """Save in kohya keys with ``.alpha`` = LORA_ALPHA (``toy.to_kohya`` divides B by alpha/rank again)."""
    from safetensors.torch import save_file

    modules = {k.removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight")}
    kohya = toy.to_kohya(lora, alphas={m: LORA_ALPHA for m in modules})
    save_file({k: v.to(torch.float16).contiguous() for k, v in kohya.items()}, str(path))


def train_classifier(net, images, labels, steps, desc) -> None:
    gen = torch.Generator().manual_seed(5)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    sched = cosine(opt, steps)
    for _ in tqdm(range(steps), desc=desc):
        index = torch.randint(len(images), (128,), generator=gen)
        x = images[index]
        shift = torch.randint(-1, 2, (2,), generator=gen).tolist()  # ±1 px jitter, and noise, for robustness
        x = torch.roll(x, shifts=shift, dims=(2, 3)) + 0.05 * torch.randn(x.shape, generator=gen)
        step(opt, sched, F.cross_entropy(net(x), labels[index]))
    with torch.no_grad():
        accuracy = (net(images).argmax(1) == labels).float().mean()
    print(f"{desc}: training accuracy {accuracy:.3f}")


def init_by_name(student, teacher) -> int:
    """Copy every tensor of ``teacher`` whose name and shape the student shares; return how many."""
    theirs = teacher.state_dict()
    mine = student.state_dict()
    shared = {k: v for k, v in theirs.items() if k in mine and mine[k].shape == v.shape}
    student.load_state_dict(shared, strict=False)
    return len(shared)


def init_bksdm(student, teacher) -> int:
    """BK-SDM's initialisation (Kim et al., ECCV 2024; ``copy_weight_from_teacher`` in Nota-NetsPresso/BK-SDM): every
    student tensor from the teacher tensor of the same name, except that an up stage's second layer
    (``up_blocks.i.resnets.1``, ``up_blocks.i.attentions.1``) comes from the teacher's third (``….2``). Return how
    many tensors were copied (same shape only)."""
    theirs, mine = teacher.state_dict(), student.state_dict()
    shared = {}
    for key, value in mine.items():
        origin = TEACHER_OF.sub(r"\1.2.", key)
        if origin in theirs and theirs[origin].shape == value.shape:
            shared[key] = theirs[origin]
    student.load_state_dict(shared, strict=False)
    return len(shared)


#: A student tensor name whose teacher tensor is the up stage's third layer (BK-SDM's remap).
TEACHER_OF = re.compile(r"^(up_blocks\.\d+\.(?:resnets|attentions))\.1\.")


def cosine(opt, steps: int, warmup: int = 50):
    warmup = min(warmup, max(1, steps // 10))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )


def step(opt, sched, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    sched.step()


def round_fp16(*models) -> None:
    """Round weights to float16 (what is saved) and back, so later training sees the shipped weights."""
    with torch.no_grad():
        for model in models:
            for p in model.parameters():
                p.copy_(p.half().float())
            model.requires_grad_(True)


if __name__ == "__main__":
    main()
