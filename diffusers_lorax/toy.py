"""Small and full-size Stable Diffusion pipelines with random weights, built offline, for the tests and
benchmarks; a "fine-tune" of one (a structured perturbation of its weights); and random LoRAs for them.

Nothing here downloads anything: configs are given as dicts, the tokenizer's vocabulary is written on the fly
(bytes as tokens, no merges), and weights come from a seeded ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

TINY_SD_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
TINY_TEXT_ENCODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=3,
    vocab_size=514,
    bos_token_id=512,
    eos_token_id=513,
    pad_token_id=513,
    max_position_embeddings=77,
)
TINY_VAE = dict(
    block_out_channels=(32, 64),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    norm_num_groups=32,
)
TINY_SDXL_UNET = dict(
    TINY_SD_UNET,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=80,  # 6 * addition_time_embed_dim + text_encoder_2 projection_dim
    cross_attention_dim=64,  # hidden sizes of both text encoders, concatenated
)
TINY_TEXT_ENCODER_2 = dict(TINY_TEXT_ENCODER, projection_dim=32)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1)


def write_tokenizer(folder: str | Path, words: tuple[str, ...] = (), max_length: int = 77) -> dict[str, int]:
    """Write a ``CLIPTokenizer`` (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``) to ``folder``; the one
    tokenizer writer of the tests, benchmarks and testbed.

    The vocabulary is CLIP's 256 byte symbols and their word-final forms, then one token per word of ``words`` with
    the byte-pair merges that build it left to right, then start/end (514 ids when ``words`` is empty). Returns the
    vocabulary (token → id).
    """
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1]] + parts[2:]
            if parts[0] not in tokens:
                tokens.append(parts[0])
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length}))
    return vocab


def write_t5_tokenizer(folder: str | Path, words: tuple[str, ...] = (), max_length: int = 512) -> dict[str, int]:
    """Write a ``T5TokenizerFast`` (``tokenizer.json``, ``tokenizer_config.json``) to ``folder``, built offline with
    the tokenizers library as T5's is: a unigram model over SentencePiece pieces ("▁word"), ``</s>`` appended,
    ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2 (T5's ids). The pieces are one per word of ``words``, then "▁" and the
    lower-case letters and digits, so that any other word falls back to characters. Returns the vocabulary."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
    pieces += [("\u2581", -2.0)] + [(c, -3.0) for c in string.ascii_lowercase + string.digits]
    model = Tokenizer(models.Unigram(pieces, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                         special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                extra_ids=0, model_max_length=max_length)
    tokenizer.save_pretrained(str(folder))
    return {piece: i for i, (piece, _) in enumerate(pieces)}


def byte_tokenizer(directory: str | Path | None = None) -> Any:
    """A ``CLIPTokenizer`` of the 514 byte-level ids of :func:`write_tokenizer` (no merges), written to ``directory``
    (kept), or by default to a temporary directory that is removed once the tokenizer is read (it keeps its
    vocabulary in memory and saves it with ``save_pretrained``): nothing is left behind."""
    from transformers import CLIPTokenizer

    if directory is not None:
        write_tokenizer(directory)
        return CLIPTokenizer.from_pretrained(str(directory))
    with tempfile.TemporaryDirectory(prefix="lorax-tok-") as folder:
        return byte_tokenizer(folder)


def sd_pipeline(
    unet: dict | None = None,
    text_encoder: dict | None = None,
    vae: dict | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A ``StableDiffusionPipeline`` with random weights (tiny by default; pass full-size config dicts for SD 1.5)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**(vae or TINY_VAE)),
        text_encoder=CLIPTextModel(CLIPTextConfig(**_clip_config(text_encoder or TINY_TEXT_ENCODER))),
        tokenizer=byte_tokenizer(),
        unet=UNet2DConditionModel(**(unet or TINY_SD_UNET)),
        scheduler=DDIMScheduler(**SCHEDULER, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def sdxl_pipeline(
    unet: dict | None = None,
    text_encoder: dict | None = None,
    text_encoder_2: dict | None = None,
    vae: dict | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A ``StableDiffusionXLPipeline`` with random weights (two text encoders, text-time embedding): tiny by
    default; pass full-size config dicts for SDXL. Each component is cast to ``dtype`` as soon as it is built, so a
    full-size float16 pipeline never holds more than one float32 component."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**(vae or TINY_VAE)).to(dtype),
        text_encoder=CLIPTextModel(CLIPTextConfig(**_clip_config(text_encoder or TINY_TEXT_ENCODER))).to(dtype),
        text_encoder_2=CLIPTextModelWithProjection(
            CLIPTextConfig(**_clip_config(text_encoder_2 or TINY_TEXT_ENCODER_2))
        ).to(dtype),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=UNet2DConditionModel(**(unet or TINY_SDXL_UNET)).to(dtype),
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clip_config(config: dict) -> dict:
    # Full-size configs from the Hub carry a 49408-token vocabulary; the byte tokenizer's ids all fit below it.
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype")}


def finetune(pipe: Any, seed: int = 1, strength: float = 0.05, rank: int = 16, noise: float = 0.01,
             components: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2")) -> Any:
    """Perturb every Linear/Conv2d weight of ``components`` (the UNet and text encoders; a DiT's ``transformer``) in
    place, like a fine-tune would.

    ``W ← W + ‖W‖_F (strength · P Qᵀ / ‖P Qᵀ‖_F + noise · G / ‖G‖_F)`` with ``P`` ``(m, rank)``, ``Q`` ``(n, rank)``
    and ``G`` ``(m, n)`` standard normal from ``seed``: a low-rank drift plus small full-rank noise, relative to each
    weight's norm. Returns ``pipe``.
    """
    gen = torch.Generator().manual_seed(seed)
    for component in components:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                W = module.weight.data
                m, n = W.shape[0], W[0].numel()
                r = min(rank, m, n)
                drift = torch.randn(m, r, generator=gen) @ torch.randn(r, n, generator=gen)
                grain = torch.randn(m, n, generator=gen)
                delta = strength * drift / drift.norm() + noise * grain / grain.norm()
                W += (W.float().norm() * delta).reshape(W.shape).to(W.dtype)
    return pipe


def distilled_unet(teacher: Any, config: dict, teacher_of: Callable[[str], str], seed: int = 2, **finetuned: Any) -> Any:
    """A student ``UNet2DConditionModel(**config)`` initialised from ``teacher`` as distilled models are (BK-SDM's
    ``copy_weight_from_teacher``): every tensor from the teacher tensor ``teacher_of(name)`` (e.g. a family's
    ``teacher_module``), then every Linear/Conv2d weight perturbed by :func:`finetune` (``seed``, ``finetuned``
    options), standing for the distillation that follows. Raises ``ValueError`` for a student tensor without a
    teacher tensor of its shape."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        student = UNet2DConditionModel(**config)
    theirs = teacher.state_dict()
    state = {}
    for name, tensor in student.state_dict().items():
        origin = theirs.get(teacher_of(name))
        if origin is None or origin.shape != tensor.shape:
            raise ValueError(f"student tensor {name} {tuple(tensor.shape)}: no teacher tensor {teacher_of(name)} of its shape")
        state[name] = origin.detach().clone()
    student.load_state_dict(state, assign=True)
    finetune(SimpleNamespace(unet=student), seed=seed, **finetuned)
    return student


def random_lora(
    pipe: Any,
    rank: int = 4,
    seed: int = 0,
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
    components: tuple[str, ...] = ("unet",),
    scale: float = 0.5,
) -> dict[str, torch.Tensor]:
    """A random PEFT-format LoRA (``<component>.<module>.lora_A/B.weight``) for every Linear/Conv2d module of
    ``components`` whose name ends with one of ``targets``. ``B A`` has Frobenius norm ``scale · ‖W‖_F`` per layer,
    so it visibly changes the output."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for component in components:
        model = getattr(pipe, component)
        # LoRAs in the wild name CLIP modules "text_model.encoder…", as transformers < 5 did.
        prefix = "text_model." if component.startswith("text_encoder") and not hasattr(model, "text_model") else ""
        for name, module in model.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or not name.endswith(targets):
                continue
            name = prefix + name
            W = module.weight
            A = torch.randn(rank, *W.shape[1:], generator=gen)
            B = torch.randn(W.shape[0], rank, *([1, 1] if W.ndim == 4 else []), generator=gen)
            norm = (B.reshape(W.shape[0], rank) @ A.reshape(rank, -1)).norm()
            B *= scale * W.detach().float().norm() / norm
            out[f"{component}.{name}.lora_A.weight"] = A
            out[f"{component}.{name}.lora_B.weight"] = B
    return out


def to_kohya(peft_lora: dict[str, torch.Tensor], alphas: dict[str, float] | None = None, sdxl: bool = False) -> dict:
    """The same LoRA in kohya/A1111 keys (``lora_unet_…``, ``lora_te_…``/``lora_te1_``), via diffusers'
    ``convert_state_dict_to_kohya``. ``alphas`` maps a PEFT module prefix (``unet.down_blocks…to_q``) to its alpha;
    ``lora_up`` is rescaled by rank/alpha so that the adapter's effect is unchanged."""
    from diffusers.utils import convert_state_dict_to_kohya

    alphas = alphas or {}
    scaled = dict(peft_lora)
    for key in peft_lora:
        if key.endswith(".lora_B.weight"):
            module = key.removesuffix(".lora_B.weight")
            if module in alphas:
                scaled[key] = peft_lora[key] * peft_lora[key].shape[1] / alphas[module]
    kohya = convert_state_dict_to_kohya(scaled)
    out = {}
    for key, value in kohya.items():
        if not sdxl:
            key = key.replace("lora_te1_", "lora_te_")
        out[key] = value
    for module, alpha in alphas.items():
        stem = convert_state_dict_to_kohya({f"{module}.lora_A.weight": torch.zeros(1, 1)})
        alpha_key = next(k for k in stem if k.endswith(".alpha"))
        out[alpha_key if sdxl else alpha_key.replace("lora_te1_", "lora_te_")] = torch.tensor(float(alpha))
    return out


def meta_modules(shapes: dict[str, tuple[int, ...]]) -> torch.nn.Module:
    """A module tree on the ``meta`` device (no memory) with, at each dotted name of ``shapes``, a ``Linear`` for a
    2-D weight shape ``(out, in)`` or a ``Conv2d`` for a 4-D one ``(out, in, kh, kw)``: real architecture shapes
    for tests and benchmarks that only read names and shapes."""
    root = torch.nn.Module()
    with torch.device("meta"):
        for module, shape in shapes.items():
            parent = root
            *path, leaf = module.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            layer = torch.nn.Linear(shape[1], shape[0]) if len(shape) == 2 else torch.nn.Conv2d(
                shape[1], shape[0], shape[2:])
            parent.add_module(leaf, layer)
    return root


def meta_pipeline(cls: type, components: dict[str, torch.nn.Module]) -> Any:
    """An instance of the pipeline class ``cls`` that holds ``components`` (e.g. :func:`meta_modules` trees) and
    nothing else: its ``__init__`` (tokenizers, scheduler, VAE) is not run."""
    pipe = cls.__new__(cls)
    for component, module in components.items():
        object.__setattr__(pipe, component, module)
    return pipe
