"""Train a LoRA-X adapter (Farhadzadeh et al., ICLR 2025) for Stable Diffusion or a Flux-shaped DiT, in the shape of diffusers'
``examples/text_to_image/train_text_to_image_lora.py``, on the shipped digits testbed (500 steps of batch 64 with
the testbed's recipe, ``benchmarks/quality/lorax.py train``, took 655 s with a diagonal core and 132 s with a full
core at 1 thread on a shared 2-core machine).

    pip install scikit-learn   # the digits
    python examples/train_lorax.py --output_dir lorax-slant --max_train_steps 500 \\
        --validation_prompt "a handwritten digit seven in lrx style"

The adapter lives in the top-r singular subspace of each adapted base weight, ``ΔW = Ũ ΔΣ Ṽᵀ``; only the core ΔΣ is
trained (``diffusers_lorax.add_lorax_adapter``), so the saved file is tiny and any pipeline of the same architecture
can load it with ``pipe.load_lora_weights_cross(source, "<output_dir>")``. Data: scikit-learn's handwritten digits
in the testbed's style look (slanted), captioned "a handwritten digit <word> in lrx style" (10 % empty prompts);
noise-prediction loss on the DDPM forward process, as in the diffusers script.

``--testbed dit`` trains the same adapter on the DiT testbed's source instead (``diffusers_lorax/quality/assets_dit``:
a ``FluxPipeline`` with 19 double and 4 single blocks, CLIP and T5 text encoders; built by
``benchmarks/quality/build_dit.py``), as diffusers' ``train_dreambooth_lora_flux.py`` trains a Flux LoRA: flow
matching (x_σ = (1 − σ) x₀ + σ ε, σ ~ U(0, 1), the transformer predicts ε − x₀ from Flux's packed 2×2 latent
patches), the text conditioning from ``encode_prompt``, the adapter on both streams' attention and feed-forward
projections and the single blocks' ``proj_mlp`` (:data:`DIT_TARGETS`); the file then loads onto the testbed's
fine-tune, Flex-style student and Chroma-style variant with ``load_lora_weights_cross``. A ``ChromaPipeline`` folder
(the testbed's ``target-chroma``: T5 alone, no pooled text, Chroma's attention mask) trains the same way:

    python examples/train_lorax.py --testbed dit --output_dir lorax-slant-dit --max_train_steps 500 \\
        --validation_prompt "a handwritten digit seven in lrx style"

A failed save does not lose the run: the trainable cores are then written as plain tensors to
``<output_dir>/trainable_cores.safetensors`` (:func:`keep_cores`; the message says where), and :func:`load_cores` puts
them back into a pipeline given the same adapter, to save again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import diffusers_lorax
from diffusers_lorax import LoraXConfig, add_lorax_adapter, save_lorax_weights
from diffusers_lorax.quality import ASSETS, data
from diffusers_lorax.quality.evaluate import guidance

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
#: The DiT testbed's adapted layers: diffusers' Flux LoRA script's default (both streams' attention and
#: feed-forward projections of the double blocks), and the single blocks' attention and MLP input.
DIT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
#: Where a failed save leaves the trained cores (in the folder it was saving to).
CORES_NAME = "trainable_cores.safetensors"
COMPONENTS = ("unet", "transformer", "text_encoder")
#: Per testbed: its source folder, its denoiser component and the layers adapted in it.
TESTBEDS = {"unet": (ASSETS / "source", "unet", UNET_TARGETS),
            "dit": (ASSETS.parent / "assets_dit" / "source", "transformer", DIT_TARGETS)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a LoRA-X adapter on the digits testbed.")
    p.add_argument("--testbed", choices=tuple(TESTBEDS), default="unet",
                   help="unet: the Stable Diffusion testbed (DDPM); dit: the Flux-shaped DiT testbed (flow matching)")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="the source base model (a diffusers folder or Hub repo id; default: the testbed's source)")
    p.add_argument("--revision", default=None)
    p.add_argument("--source_id", default=None,
                   help="how the files name the source: a Hub repo id (then loaders can pass source=None) or a label "
                        "(default: --pretrained_model_name_or_path)")
    p.add_argument("--output_dir", default="lorax-model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=lambda s: float(s) if "." in s else int(s), default=1.0,
                   help="r per layer: an int (capped at min(m, n)) or a fraction of min(m, n) (default 1.0)")
    p.add_argument("--core", choices=("diagonal", "full"), default="diagonal")
    p.add_argument("--train_text_encoder", action="store_true", help="also adapt the text encoder's attention")
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--max_train_steps", type=int, default=500)
    p.add_argument("--learning_rate", type=float, default=1e-1)
    p.add_argument("--lr_scheduler", default="cosine", help="diffusers.optimization.get_scheduler's names")
    p.add_argument("--lr_warmup_steps", type=int, default=50)
    p.add_argument("--adam_weight_decay", type=float, default=0.0)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--checkpointing_steps", type=int, default=250)
    p.add_argument("--validation_prompt", default=None)
    p.add_argument("--num_validation_images", type=int, default=4)
    p.add_argument("--validation_steps", type=int, default=250)
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--registry", default=None, help="where the SVD bases are cached (default: the user's registry)")
    p.add_argument("--guidance_scale", type=float, default=3.5,
                   help="the guidance embedding's value while training a DiT that has one (Flux dev's script's)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.pretrained_model_name_or_path is None:
        args.pretrained_model_name_or_path = str(TESTBEDS[args.testbed][0])
    return args


def load_models(args):
    """The pipeline, every weight frozen, and the DDPM noise scheduler (``None`` for the DiT testbed: flow
    matching; its pipeline is the ``FluxPipeline`` or ``ChromaPipeline`` that the folder's ``model_index.json``
    names)."""
    from diffusers import DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline

    if args.testbed == "dit":
        pipe = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision,
                                                 dtype=torch.float32)
        noise_scheduler = None
    else:
        pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision,
                                                       dtype=torch.float32, safety_checker=None)
        noise_scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler",
                                                        revision=args.revision)
    pipe.set_progress_bar_config(disable=True)
    for component in ("vae", "text_encoder", "text_encoder_2", "unet", "transformer"):
        if getattr(pipe, component, None) is not None:
            getattr(pipe, component).requires_grad_(False)
    return pipe, noise_scheduler


def dataset(pipe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents ``(N, 4, 8, 8)`` of the slanted digits (VAE mean × scaling factor), their captions' token ids
    ``(N, L)`` and the empty prompt's ``(L,)``."""
    ink, labels = data.load_digits()
    with torch.no_grad():
        latents = pipe.vae.encode(data.to_pixels(data.slant(ink))).latent_dist.mean * pipe.vae.config.scaling_factor
    prompts = [data.prompt(d, styled=True) for d in range(10)] + [""]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return latents, ids[labels], ids[10]


def dit_dataset(pipe) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The DiT testbed's training data: the slanted digits' latents as Flux packs them, ``(N, 16, 16)`` (VAE mean,
    ``(z − shift) · scale``, 2×2 patches of the 8×8×4 latent), their digit labels ``(N,)`` and the eleven prompts
    (ten styled captions, then the empty prompt)."""
    ink, labels = data.load_digits()
    config = pipe.vae.config
    with torch.no_grad():
        z = pipe.vae.encode(data.to_pixels(data.slant(ink))).latent_dist.mean
    z = (z - (config.shift_factor or 0.0)) * config.scaling_factor
    n, c, h, w = z.shape  # packed as FluxPipeline packs latents: one token per 2×2 patch, channels c·4
    packed = z.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)
    return packed, labels, [data.prompt(d, styled=True) for d in range(10)] + [""]


def flow_matching_loss(args, pipe, x0: torch.Tensor, choice: torch.Tensor, prompts: list[str],
                       generator: torch.Generator) -> torch.Tensor:
    """The DiT testbed's loss on packed latents ``x0`` ``(B, L, C)`` with prompts ``prompts[choice]``: noise ε and
    σ ~ U(0, 1) from ``generator``, x_σ = (1 − σ) x₀ + σ ε, MSE of the transformer's output to ε − x₀. The text
    conditioning as the pipeline gives it: Flux's T5 sequence and CLIP pooled output, or Chroma's T5 sequence and
    attention mask (text tokens up to the first padding token, then every image token)."""
    with torch.set_grad_enabled(args.train_text_encoder):
        if type(pipe).__name__ == "ChromaPipeline":
            embeds, text_ids, mask = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                                        max_sequence_length=data.MAX_TOKENS)[:3]
            text = {"attention_mask": torch.cat([mask[choice], torch.ones(len(x0), x0.shape[1])], dim=1)}
        else:
            embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None,
                                                          max_sequence_length=data.MAX_TOKENS)
            text = {"pooled_projections": pooled[choice]}
    noise = torch.randn(x0.shape, generator=generator)
    sigma = torch.rand(len(x0), generator=generator)
    noisy = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    side = int(x0.shape[1] ** 0.5)  # positions of the patches, as FluxPipeline gives them
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] += torch.arange(side)[:, None]
    img_ids[..., 2] += torch.arange(side)[None, :]
    transformer = pipe.transformer
    if getattr(transformer.config, "guidance_embeds", False):
        text["guidance"] = torch.full((len(x0),), args.guidance_scale)
    out = transformer(hidden_states=noisy, timestep=sigma, encoder_hidden_states=embeds[choice], txt_ids=text_ids,
                      img_ids=img_ids.reshape(-1, 3), **text).sample
    return F.mse_loss(out, noise - x0)


def unet_loss(args, pipe, noise_scheduler):
    """The UNet testbed's training loss as a function of the batch generator: DDPM noise prediction on the slanted
    digits' latents, 10 % of the captions empty (for classifier-free guidance)."""
    latents, caption_ids, empty_ids = dataset(pipe)

    def loss(generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(len(latents), (args.train_batch_size,), generator=generator)
        ids = caption_ids[index].clone()
        ids[torch.rand(len(index), generator=generator) < 0.1] = empty_ids
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        with torch.set_grad_enabled(args.train_text_encoder):
            cond = pipe.text_encoder(ids).last_hidden_state
        return F.mse_loss(pipe.unet(noise_scheduler.add_noise(x0, noise, t), t, cond).sample, noise)
    return loss


def dit_loss(args, pipe):
    """The DiT testbed's training loss as a function of the batch generator (:func:`flow_matching_loss`), 10 % of
    the prompts empty."""
    latents, labels, prompts = dit_dataset(pipe)

    def loss(generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(len(latents), (args.train_batch_size,), generator=generator)
        choice = labels[index].clone()
        choice[torch.rand(len(index), generator=generator) < 0.1] = len(prompts) - 1
        return flow_matching_loss(args, pipe, latents[index], choice, prompts, generator)
    return loss


def save(args, pipe, step: int | None, settings: dict) -> Path:
    folder = Path(args.output_dir) / (f"checkpoint-{step}" if step is not None else "")
    denoiser = TESTBEDS[args.testbed][1]
    common = dict(**{denoiser: getattr(pipe, denoiser)},
                  text_encoder=pipe.text_encoder if args.train_text_encoder else None,
                  source=args.source_id or args.pretrained_model_name_or_path, source_revision=args.revision,
                  training=settings)
    try:
        path = save_lorax_weights(folder, **common)
        if step is None:
            save_lorax_weights(folder, standalone=True, **common)
    except Exception:
        kept = keep_cores(pipe, folder)
        print(f"saving the LoRA-X adapter failed (the error follows); the trained cores are kept in {kept}: add the "
              f"adapter again with the same options and call load_cores(pipe, {str(kept)!r}) (this script's), then "
              "save_lorax_weights", file=sys.stderr)
        raise
    return path


def keep_cores(pipe, folder: Path) -> Path:
    """Write every trainable parameter (the LoRA-X cores, ``(r,)`` or ``(r, r)``, in their dtype) as plain tensors
    named ``<component>.<parameter name>`` to ``folder/trainable_cores.safetensors``; return its path."""
    from safetensors.torch import save_file

    cores = {f"{component}.{name}": param.detach().clone(memory_format=torch.contiguous_format)
             for component in COMPONENTS if getattr(pipe, component, None) is not None
             for name, param in getattr(pipe, component).named_parameters() if param.requires_grad}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(cores, str(folder / CORES_NAME))
    return folder / CORES_NAME


def load_cores(pipe, path: str | Path) -> None:
    """Load the cores :func:`keep_cores` wrote into ``pipe``, whose components hold the same LoRA-X adapter (added
    again with the same options). Raises ``ValueError`` naming a core the pipeline has no place for."""
    from safetensors.torch import load_file

    cores = load_file(str(path))
    for component in COMPONENTS:
        own = {key.split(".", 1)[1]: value for key, value in cores.items() if key.startswith(f"{component}.")}
        if own:
            unexpected = getattr(pipe, component).load_state_dict(own, strict=False).unexpected_keys
            if unexpected:
                raise ValueError(f"{path}: the {component} has no LoRA-X core {unexpected[0]!r}: add the adapter "
                                 "with the options it was trained with")


def validate(args, pipe, step: int) -> list[Path]:
    generator = torch.Generator().manual_seed(args.seed)
    count = args.num_validation_images
    # the DiT testbed has no guidance embedding: classifier-free guidance against the empty prompt, as each of its
    # pipelines takes it (the quality table's sampling)
    extra = guidance(pipe, count) if args.testbed == "dit" else {}
    images = pipe([args.validation_prompt] * count, height=data.SIZE, width=data.SIZE,
                  num_inference_steps=args.num_inference_steps, generator=generator, **extra).images
    paths = []
    for i, image in enumerate(images):
        paths.append(Path(args.output_dir) / f"validation-{step}-{i}.png")
        image.resize((64, 64)).save(paths[-1])
    return paths


def main(argv=None) -> Path:
    from diffusers.optimization import get_scheduler

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    pipe, noise_scheduler = load_models(args)
    loss_of = dit_loss(args, pipe) if args.testbed == "dit" else unet_loss(args, pipe, noise_scheduler)
    _, denoiser, targets = TESTBEDS[args.testbed]
    params = add_lorax_adapter(getattr(pipe, denoiser), LoraXConfig(r=args.rank, target_modules=targets,
                                                                    core=args.core), registry=args.registry)
    if args.train_text_encoder:
        params += add_lorax_adapter(pipe.text_encoder, LoraXConfig(r=args.rank, target_modules=TEXT_TARGETS,
                                                                   core=args.core), registry=args.registry)
    print(f"LoRA-X adapter: {len(params)} layers, {sum(p.numel() for p in params):,} trainable values")
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    settings = {k: getattr(args, k) for k in ("testbed", "max_train_steps", "train_batch_size", "learning_rate",
                                              "lr_scheduler", "lr_warmup_steps", "rank", "core", "seed")}
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    for step in range(1, args.max_train_steps + 1):
        loss = loss_of(generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == 1:
            print(json.dumps({"step": step, "loss": round(float(loss.detach()), 5), "lr": lr_scheduler.get_last_lr()[0]}))
        if step % args.checkpointing_steps == 0:
            print(f"saved {save(args, pipe, step, settings)}")
        if args.validation_prompt and (step % args.validation_steps == 0 or step == args.max_train_steps):
            print(f"validation images: {[str(p) for p in validate(args, pipe, step)]}")
    settings["seconds"] = round(time.perf_counter() - started)  # the training loop's wall time, saves included
    path = save(args, pipe, None, settings)
    print(f"saved {path} and its standalone form; load it on any pipeline of this architecture with\n"
          f"  pipe.load_lora_weights_cross({args.source_id or args.pretrained_model_name_or_path!r}, "
          f"{args.output_dir!r})  # diffusers_lorax {diffusers_lorax.__version__}")
    return path


if __name__ == "__main__":
    main()
