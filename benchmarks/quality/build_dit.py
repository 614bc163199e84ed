"""Rebuild the DiT testbed shipped in ``diffusers_lorax/quality/assets_dit`` (docs/quality.md, "The DiT testbed").

    pip install scikit-learn && python benchmarks/quality/build_dit.py [--out DIR] [--scale 1.0] [--resume]

Deterministic (every stage seeded; one CPU thread, ``THREADS``) and CPU only. It needs the UNet testbed (``quality/assets``): its
VAE encodes the digits and its classifiers score the images. What it trains, in order, on scikit-learn's digits at
16×16 (``quality/data.py``; configs in ``quality/dit.py``):

1. ``source``: a CLIP text encoder, a T5 encoder and a ``FluxTransformer2DModel`` (19 double + 4 single blocks,
   width 32) trained together from scratch by flow matching (velocity ε − x₀ at σ ~ U(0, 1), as diffusers' Flux
   training script) on plain digits, prompts "a handwritten digit <word>" (10 % empty, for guidance).
2. ``target-finetune``: the source transformer trained further on thick strokes (text encoders kept).
3. ``target-flex``: 8 double blocks, initialised by the published Flex.1 map (student double block i from the
   teacher's ``FLEX_KEPT[i]``; everything else by name) and distilled from the source: task loss + output KD +
   feature KD on every kept block's output against its teacher block's.
4. ``target-chroma``: a ``ChromaTransformer2DModel`` (no per-block modulation projections; T5 only, with Chroma's
   text mask) initialised from the source by name; its approximator is first fitted to the source's modulations
   (σ only: Chroma has no pooled text), then the whole model distilled as the Flex student (every block paired).
5. The style LoRA, one recipe on each model: rank 8, alpha 4, on every attention, feed-forward, projection and
   modulation linear of the double and single blocks and (Flux pipelines) on the CLIP encoder's attention; slanted
   digits, prompts "a handwritten digit <word> in lrx style"; saved by the pipeline's ``save_lora_weights`` with
   PEFT metadata (diffusers keys ``transformer.…lora_A.weight``).

Weights are rounded to float16 as soon as a model is trained and saved in float16; the LoRAs are trained on the
rounded models.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build  # noqa: E402  (the UNet testbed's recipe: batch, schedule, optimiser step, fp16 rounding, LoRA rank)

from diffusers_lorax import toy  # noqa: E402
from diffusers_lorax.quality import ASSETS, data, dit  # noqa: E402

STEPS = dict(source=2000, finetune=500, flex=1000, chroma_fit=300, chroma=400, lora=400)
#: Intra-op threads: one. The models are tiny (width 32); on two cores that other jobs keep busy, two threads made a
#: training step 10-20× slower than one (0.5 s against 5-9 s per step measured here; cf. ``demo.DEMO_THREADS``).
THREADS = 1
#: The style LoRA's layers in the transformer (diffusers names; PEFT matches the regex on the whole module name).
LORA_TARGETS = (r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                r"to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear|norm1_context\.linear|"
                r"norm\.linear|proj_mlp|proj_out)")
TEXT_LORA_TARGETS = build.TEXT_LORA_TARGETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=dit.DIT_ASSETS, help=f"output folder (default: {dit.DIT_ASSETS})")
    parser.add_argument("--resume", action="store_true", help="keep the models and LoRAs already saved in --out")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count (a quick smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    steps = {k: max(2, round(v * args.scale)) for k, v in STEPS.items()}
    started = time.perf_counter()
    build_testbed(args.out, steps, args.resume)
    print(f"built {args.out} in {time.perf_counter() - started:.0f} s")


class Text:
    """The eleven prompts (ten digits, plain or styled, and the empty prompt) tokenized for CLIP and T5 as the
    pipelines tokenize them, and encoded as each pipeline encodes them (``flux``, ``chroma``)."""

    def __init__(self, clip_tokenizer, t5_tokenizer, styled: bool = False):
        prompts = [data.prompt(d, styled) for d in range(10)] + [""]
        self.clip_ids = clip_tokenizer(prompts, padding="max_length", max_length=data.MAX_TOKENS,
                                       truncation=True, return_tensors="pt").input_ids
        t5 = t5_tokenizer(prompts, padding="max_length", max_length=data.MAX_TOKENS, truncation=True,
                          return_tensors="pt")
        self.t5_ids, self.t5_mask = t5.input_ids, t5.attention_mask
        self.prompts = prompts

    def flux(self, clip, t5) -> dict[str, torch.Tensor]:
        """FluxPipeline.encode_prompt: T5's unmasked sequence ``(11, L, d)`` and CLIP's pooled output ``(11, h)``."""
        return {"encoder_hidden_states": t5(self.t5_ids)[0], "pooled_projections": clip(self.clip_ids).pooler_output}

    def chroma(self, t5) -> dict[str, torch.Tensor]:
        """ChromaPipeline.encode_prompt: T5 run with the tokenizer's mask; the transformer's mask keeps the text
        up to the first padding token, then every image token."""
        seq = t5(self.t5_ids, attention_mask=self.t5_mask)[0]
        lengths = self.t5_mask.sum(dim=1, keepdim=True)
        mask = (torch.arange(self.t5_ids.shape[1])[None] <= lengths).to(seq.dtype)
        return {"encoder_hidden_states": seq, "attention_mask": mask}


IMAGE_TOKENS = (data.SIZE // 4) ** 2  # 8×8 latents in 2×2 patches


def condition(text: dict[str, torch.Tensor], choice: torch.Tensor) -> dict[str, torch.Tensor]:
    """The transformer's keyword arguments for a batch of prompt indices ``choice`` ``(B,)``."""
    out = {k: v[choice] for k, v in text.items()}
    if "attention_mask" in out:  # text first, then the image tokens, as ChromaPipeline._prepare_attention_mask
        out["attention_mask"] = torch.cat([out["attention_mask"], torch.ones(len(choice), IMAGE_TOKENS)], dim=1)
    side = data.SIZE // 4
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] += torch.arange(side)[:, None]
    img_ids[..., 2] += torch.arange(side)[None, :]
    return out | {"img_ids": img_ids.reshape(-1, 3), "txt_ids": torch.zeros(data.MAX_TOKENS, 3)}


def flow_batch(latents: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
    """One flow-matching batch drawn from ``gen`` in a fixed order: latents, prompts (10 % empty), noise, σ;
    returns ``(choice, x_σ, σ, target)`` with x_σ = (1 − σ) x₀ + σ ε and target ε − x₀ (packed latents)."""
    index = torch.randint(len(latents), (build.BATCH,), generator=gen)
    choice = labels[index].clone()
    choice[torch.rand(build.BATCH, generator=gen) < 0.1] = 10
    x0 = latents[index]
    noise = torch.randn(x0.shape, generator=gen)
    sigma = torch.rand(build.BATCH, generator=gen)
    s = sigma[:, None, None]
    return choice, (1 - s) * x0 + s * noise, sigma, noise - x0


def train_flow(model, encode, latents, labels, steps: int, lr: float, desc: str, params=None,
               weight_decay: float = 1e-2) -> None:
    """Flow-matching training (MSE to the velocity, cosine learning rate) of ``params`` (default: ``model``'s);
    ``encode()`` gives the text conditioning of the eleven prompts, recomputed each step (text encoders may train)."""
    gen = torch.Generator().manual_seed(2)
    params = list(params if params is not None else model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = build.cosine(opt, steps)
    for _ in tqdm(range(steps), desc=desc):
        choice, noisy, sigma, target = flow_batch(latents, labels, gen)
        out = model(hidden_states=noisy, timestep=sigma, **condition(encode(), choice)).sample
        build.step(opt, sched, F.mse_loss(out, target))


def block_outputs(model) -> tuple[list, list]:
    """Forward hooks collecting each double and single block's output (text and image tokens, concatenated as the
    single blocks see them); returns ``(features, hooks)``."""
    features = []

    def keep(module, args, out):
        features.append(torch.cat(out, dim=1) if isinstance(out, tuple) else out)

    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    return features, [block.register_forward_hook(keep) for block in blocks]


def distill(student, teacher, s_encode, t_encode, latents, labels, steps: int, pairs: list[int], desc: str,
            seed: int) -> None:
    """Distillation as the UNet testbed's (BK-SDM): task loss + output KD + feature KD, weights 1, 1, 1; the
    feature KD pairs student block j with teacher block ``pairs[j]`` (double blocks, then single blocks)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(student.parameters(), lr=5e-4, weight_decay=1e-2)
    sched = build.cosine(opt, steps)
    (s_feat, s_hooks), (t_feat, t_hooks) = block_outputs(student), block_outputs(teacher)
    for _ in tqdm(range(steps), desc=desc):
        choice, noisy, sigma, target = flow_batch(latents, labels, gen)
        s_feat.clear(), t_feat.clear()
        with torch.no_grad():
            teacher_out = teacher(hidden_states=noisy, timestep=sigma, **condition(t_encode(), choice)).sample
        out = student(hidden_states=noisy, timestep=sigma, **condition(s_encode(), choice)).sample
        feature_kd = sum(F.mse_loss(s_feat[j], t_feat[i]) for j, i in enumerate(pairs))
        build.step(opt, sched, F.mse_loss(out, target) + F.mse_loss(out, teacher_out) + feature_kd)
    for hook in s_hooks + t_hooks:
        hook.remove()


def modulations(teacher, sigma: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The source's modulation vectors ``(B, 3 S + 12 D + 2, width)`` in Chroma's order (single blocks; double blocks'
    image then text streams; the output norm's shift and scale)."""
    temb = F.silu(teacher.time_text_embed(sigma * 1000, pooled))
    singles = [b.norm.linear(temb).chunk(3, dim=1) for b in teacher.single_transformer_blocks]
    image = [b.norm1.linear(temb).chunk(6, dim=1) for b in teacher.transformer_blocks]
    text = [b.norm1_context.linear(temb).chunk(6, dim=1) for b in teacher.transformer_blocks]
    scale, shift = teacher.norm_out.linear(temb).chunk(2, dim=1)
    vectors = [v for group in (*singles, *image, *text) for v in group] + [shift, scale]
    return torch.stack(vectors, dim=1)


def fit_approximator(chroma, teacher, text, steps: int) -> None:
    """Fit Chroma's approximator (its modulation from σ alone) to the source's modulations over σ and prompts."""
    gen = torch.Generator().manual_seed(10)
    params = list(chroma.distilled_guidance_layer.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    sched = build.cosine(opt, steps)
    for _ in tqdm(range(steps), desc="target-chroma: approximator"):
        choice = torch.randint(10, (build.BATCH,), generator=gen)
        sigma = torch.rand(build.BATCH, generator=gen)
        with torch.no_grad():
            target = modulations(teacher, sigma, text()["pooled_projections"][choice])
        out = chroma.distilled_guidance_layer(chroma.time_text_embed(sigma * 1000))
        build.step(opt, sched, F.mse_loss(out, target))


def train_lora(model, clip, encode, latents, labels, steps: int, desc: str) -> dict[str, dict[str, torch.Tensor]]:
    """Train one style LoRA (PEFT's ``inject_adapter_in_model``) on copies of ``model`` and ``clip`` (``None``: a
    pipeline without CLIP); ``encode(clip)`` gives the text conditioning. Returns component → PEFT state dict in
    float16 (the models' own module names, as a diffusers training script saves them), alpha kept apart."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    model, clip = copy.deepcopy(model), copy.deepcopy(clip)
    torch.manual_seed(3)
    adapted = {"transformer": (model, LORA_TARGETS)} | ({"text_encoder": (clip, TEXT_LORA_TARGETS)} if clip else {})
    for module, targets in adapted.values():
        config = LoraConfig(r=build.LORA_RANK, lora_alpha=build.LORA_ALPHA, target_modules=targets,
                            init_lora_weights="gaussian")
        inject_adapter_in_model(config, module, adapter_name="style")
    params = []
    for module, _ in adapted.values():
        for name, p in module.named_parameters():
            p.requires_grad_("lora_" in name)
            params += [p] if "lora_" in name else []
    train_flow(model, lambda: encode(clip), latents, labels, steps, lr=2e-3, desc=desc, params=params,
               weight_decay=0.0)
    return {component: {k: v.detach().to(torch.float16).contiguous()
                        for k, v in get_peft_model_state_dict(module, adapter_name="style").items()}
            for component, (module, _) in adapted.items()}


def save_lora(pipeline_class, lora: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    """Save with the pipeline class's ``save_lora_weights`` and PEFT ``LoraConfig`` metadata (r, lora_alpha, the
    adapted modules) per component."""
    from peft import LoraConfig

    arguments = {}
    for component, state_dict in lora.items():
        modules = sorted({k.rsplit(".lora_", 1)[0] for k in state_dict})
        config = LoraConfig(r=build.LORA_RANK, lora_alpha=build.LORA_ALPHA, target_modules=modules).to_dict()
        arguments[f"{component}_lora_layers"] = state_dict
        arguments[f"{component}_lora_adapter_metadata"] = {k: sorted(v) if isinstance(v, set) else v
                                                           for k, v in config.items()}
    pipeline_class.save_lora_weights(str(path.parent), weight_name=path.name, **arguments)


def flex_init(student, teacher) -> int:
    """Flex.1's initialisation: student double block i from the teacher's ``FLEX_KEPT[i]``, every other tensor by
    name (same shape). Returns how many tensors were copied."""
    theirs, mine = teacher.state_dict(), student.state_dict()
    shared = {}
    for key in mine:
        origin = key
        if key.startswith("transformer_blocks."):
            index, rest = key.removeprefix("transformer_blocks.").split(".", 1)
            origin = f"transformer_blocks.{dit.FLEX_KEPT[int(index)]}.{rest}"
        if origin in theirs and theirs[origin].shape == mine[key].shape:
            shared[key] = theirs[origin]
    student.load_state_dict(shared, strict=False)
    return len(shared)


def build_testbed(out: Path, steps: dict[str, int], resume: bool = False) -> None:
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    ink, labels = data.load_digits()
    looks = {"plain": ink, "thick": data.thicken(ink), "slanted": data.slant(ink)}
    if out.exists() and not resume:
        shutil.rmtree(out)
    (out / "loras").mkdir(parents=True, exist_ok=True)
    # --resume keeps every model already saved in ``out``; each stage after the source seeds itself.
    kept = {name: diffusers.DiffusionPipeline.from_pretrained(out / name, dtype=torch.float32)
            for name in dit.MODELS if resume and (out / name / "model_index.json").exists()}
    if "source" in kept:
        source = kept["source"]
        vae, clip, t5, transformer = source.vae, source.text_encoder, source.text_encoder_2, source.transformer
        clip_tokenizer, t5_tokenizer = source.tokenizer, source.tokenizer_2
    else:
        clip_tokenizer, t5_tokenizer, vocab, t5_vocab = tokenizers()
        vae = diffusers.AutoencoderKL.from_pretrained(ASSETS / "source" / "vae", dtype=torch.float32)
        with torch.no_grad():  # Flux's latents are shifted, then scaled: z → (z − shift) · scale
            z = torch.cat([vae.encode(data.to_pixels(x)).latent_dist.mean for x in looks.values()])
        vae.register_to_config(shift_factor=round(float(z.mean()), 4))
    latents = {name: pack(vae, x) for name, x in looks.items()}
    text, styled = Text(clip_tokenizer, t5_tokenizer), Text(clip_tokenizer, t5_tokenizer, styled=True)

    # 1. source: text encoders and transformer from scratch
    if "source" not in kept:
        clip = CLIPTextModel(CLIPTextConfig(**data.TEXT_ENCODER, vocab_size=len(vocab), bos_token_id=vocab[
            "<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
        t5 = T5EncoderModel(T5Config(**dit.T5, vocab_size=len(t5_vocab)))
        transformer = diffusers.FluxTransformer2DModel(**dit.TRANSFORMER)
        train_flow(transformer, lambda: text.flux(clip, t5), latents["plain"], labels, steps["source"], lr=1e-3,
                   desc="source", params=[*transformer.parameters(), *clip.parameters(), *t5.parameters()])
        build.round_fp16(transformer, clip, t5)
    clip.requires_grad_(False), t5.requires_grad_(False)
    with torch.no_grad():
        flux_text, chroma_text = text.flux(clip, t5), text.chroma(t5)

    def save(name: str, model) -> None:  # each model as soon as it is trained (what --resume keeps)
        if name not in kept:
            pipe = assemble(name, model, vae, clip, clip_tokenizer, t5, t5_tokenizer)
            check_encoding(pipe, text, flux_text, chroma_text)
            pipe.to(torch.float16).save_pretrained(out / name)
            pipe.to(torch.float32)  # lossless: the weights were rounded to float16 already

    save("source", transformer)
    models = {"source": transformer, **{name: kept[name].transformer for name in dit.MODELS[1:] if name in kept}}
    train_targets(models, flux_text, chroma_text, latents, labels, steps, save)

    # 5. the style LoRA on each model; T5 frozen (CLIP's attention is adapted)
    with torch.no_grad():
        styled_t5, styled_chroma = t5(styled.t5_ids)[0], styled.chroma(t5)
    for name, model in models.items():
        path = out / "loras" / f"slant-{name}.safetensors"
        if resume and path.exists():
            continue
        if dit.PIPELINES[name] == "ChromaPipeline":
            lora = train_lora(model, None, lambda _: styled_chroma, latents["slanted"], labels, steps["lora"],
                              f"lora on {name}")
        else:
            lora = train_lora(model, clip, lambda c: {"encoder_hidden_states": styled_t5, "pooled_projections":
                                                      c(styled.clip_ids).pooler_output},
                              latents["slanted"], labels, steps["lora"], f"lora on {name}")
        save_lora(getattr(diffusers, dit.PIPELINES[name]), lora, path)
    (out / "build.json").write_text(json.dumps({"steps": steps, "batch": build.BATCH, "lora_rank": build.LORA_RANK,
                                                "lora_alpha": build.LORA_ALPHA, "threads": THREADS}, indent=1))


def train_targets(models: dict, flux_text: dict, chroma_text: dict, latents: dict, labels, steps: dict, save) -> None:
    """Train the fine-tune (2.), the Flex-style student (3.) and the Chroma-style variant (4.) that ``models`` does
    not hold yet, ``save(name, model)`` each and add it to ``models`` (each stage seeds itself)."""
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel

    source = models["source"]
    singles = [dit.DOUBLE_BLOCKS + i for i in range(dit.TRANSFORMER["num_single_layers"])]

    def finish(name: str, model) -> None:
        build.round_fp16(model)
        models[name] = model
        save(name, model)

    if "target-finetune" not in models:
        finetuned = copy.deepcopy(source)
        train_flow(finetuned, lambda: flux_text, latents["thick"], labels, steps["finetune"], lr=2e-4,
                   desc="target-finetune")
        finish("target-finetune", finetuned)
    if "target-flex" not in models:
        torch.manual_seed(6)
        flex = FluxTransformer2DModel(**dit.STUDENT)
        print(f"target-flex: {flex_init(flex, source)} of {len(flex.state_dict())} tensors from the source "
              f"(double blocks {dit.FLEX_KEPT})")
        distill(flex, source, lambda: flux_text, lambda: flux_text, latents["plain"], labels, steps["flex"],
                [*dit.FLEX_KEPT, *singles], "target-flex", seed=7)
        finish("target-flex", flex)
    if "target-chroma" not in models:
        torch.manual_seed(8)
        chroma = ChromaTransformer2DModel(**dit.CHROMA)
        print(f"target-chroma: {build.init_by_name(chroma, source)} of {len(chroma.state_dict())} tensors from "
              "the source")
        fit_approximator(chroma, source, lambda: flux_text, steps["chroma_fit"])
        distill(chroma, source, lambda: chroma_text, lambda: flux_text, latents["plain"], labels, steps["chroma"],
                list(range(dit.DOUBLE_BLOCKS + len(singles))), "target-chroma", seed=9)
        finish("target-chroma", chroma)


def tokenizers():
    """The CLIP and T5 tokenizers of the testbed's vocabulary, written offline (``toy``), and their vocabularies."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    with tempfile.TemporaryDirectory() as folder:
        vocab = toy.write_tokenizer(Path(folder) / "clip", data.VOCABULARY, data.MAX_TOKENS)
        t5_vocab = toy.write_t5_tokenizer(Path(folder) / "t5", data.VOCABULARY, data.MAX_TOKENS)
        return (CLIPTokenizer.from_pretrained(Path(folder) / "clip"),
                T5TokenizerFast.from_pretrained(Path(folder) / "t5"), vocab, t5_vocab)


@torch.no_grad()
def pack(vae, ink: torch.Tensor) -> torch.Tensor:
    """Ink ``(N, 1, 16, 16)`` → Flux's packed latents ``(N, 16, 16)``: (z − shift) · scale in 2×2 patches."""
    from diffusers import FluxPipeline

    z = vae.encode(data.to_pixels(ink)).latent_dist.mean
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    return FluxPipeline._pack_latents(z, *z.shape)


def assemble(name: str, transformer, vae, clip, clip_tokenizer, t5, t5_tokenizer):
    """The pipeline of model ``name``: Flux with both text encoders, or Chroma with T5 alone."""
    import diffusers

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**dit.SCHEDULER)
    if dit.PIPELINES[name] == "ChromaPipeline":
        return diffusers.ChromaPipeline(scheduler=scheduler, vae=vae, text_encoder=t5, tokenizer=t5_tokenizer,
                                        transformer=transformer)
    return diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer,
                                  text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)


@torch.no_grad()
def check_encoding(pipe, text: Text, flux_text: dict, chroma_text: dict) -> None:
    """The conditioning trained on is the pipeline's own: ``encode_prompt`` gives the same tensors."""
    if type(pipe).__name__ == "ChromaPipeline":
        embeds, _, mask = pipe.encode_prompt(text.prompts, do_classifier_free_guidance=False,
                                             max_sequence_length=data.MAX_TOKENS)[:3]
        pairs = [(embeds, chroma_text["encoder_hidden_states"]), (mask, chroma_text["attention_mask"])]
    else:
        embeds, pooled, _ = pipe.encode_prompt(text.prompts, prompt_2=None, max_sequence_length=data.MAX_TOKENS)
        pairs = [(embeds, flux_text["encoder_hidden_states"]), (pooled, flux_text["pooled_projections"])]
    for got, expected in pairs:
        torch.testing.assert_close(got.float(), expected.float())


if __name__ == "__main__":
    main()
