"""Tiny random pipelines of diffusers' LoRA families, built offline.

:data:`FAMILIES` maps a family name to a :class:`Family`: the diffusers pipeline class, the components a LoRA of that
family adapts (the denoiser — ``unet``, ``transformer``, ``transformer_2`` — and the text encoders the mixin lists in
``_lora_loadable_modules``) as real diffusers / transformers model classes with tiny configs (2 heads of 8–16
dimensions, one or two blocks of each kind), and the LoRA formats diffusers reads for it
(:mod:`diffusers_lorax.tiny.loras`). Every other constructor argument (tokenizers, VAE, scheduler, text encoders no
LoRA adapts) is ``None``, which every listed pipeline accepts. A family that cannot be built says why in ``skip``.

Configs are reduced from the real ones (``../shared/realcases/configs``; the architecture flags are kept, widths and
depths cut) or taken from diffusers' own LoRA tests. Nothing is downloaded; weights come from a seeded generator.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

#: A CLIP text encoder small enough for every family that adapts one (SD, SDXL, SD3, Flux).
CLIP = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, vocab_size=1000,
            max_position_embeddings=77, projection_dim=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)
#: A double/single-block DiT of Flux's shape (Flux, Flux Kontext; Chroma without the pooled projection).
FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8))
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
           text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
           rope_max_seq_len=32)
UNET = dict(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)


@dataclass(frozen=True)
class Component:
    """A model built from a class of ``library`` (``"diffusers"`` or ``"transformers"``) and its config: diffusers
    models take the config as keyword arguments, transformers models a ``config_class`` instance."""

    library: str
    model_class: str
    config: Mapping[str, Any]
    config_class: str | None = None

    def build(self) -> torch.nn.Module:
        import importlib

        module = importlib.import_module(self.library)
        cls = getattr(module, self.model_class)
        if self.config_class is None:
            return cls(**self.config)
        return cls(getattr(module, self.config_class)(**self.config))


def diffusers_model(model_class: str, **config: Any) -> Component:
    return Component("diffusers", model_class, config)


def clip(model_class: str = "CLIPTextModel", **config: Any) -> Component:
    return Component("transformers", model_class, {**CLIP, **config}, "CLIPTextConfig")


@dataclass(frozen=True)
class Family:
    """One LoRA family: ``pipeline`` (a diffusers class name), the LoRA-adaptable ``components``, extra constructor
    arguments (``pipeline_kwargs``, e.g. Wan 2.2's ``boundary_ratio``), the LoRA ``formats`` diffusers reads for it
    (names of :data:`diffusers_lorax.tiny.loras.FORMATS`), and ``skip``: why it is not built, or ``None``."""

    name: str
    pipeline: str
    components: Mapping[str, Component] = field(default_factory=dict)
    formats: tuple[str, ...] = ()
    adapted: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=dict)
    skip: str | None = None

    def adapts(self, component: str, module: str) -> bool:
        """Whether the random LoRAs adapt ``module`` of ``component`` (a Linear or Conv2d): all but those whose
        name contains one of ``exclude``."""
        return not any(part in module for part in self.exclude)

    def file_module(self, component: str, module: str) -> str:
        """``module``'s name in LoRA files: CLIP text encoders' modules under ``text_model.`` as transformers < 5
        named them (and LoRAs in the wild still do)."""
        spec = self.components[component]
        return f"text_model.{module}" if spec.model_class == "CLIPTextModel" else module

    @property
    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline)

    def build(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
        """The pipeline with seeded random weights: each component is built in float32 from ``seed`` (in the order
        of ``components``, so two builds with one seed are equal bit for bit), then cast to ``dtype``; every other
        constructor argument is ``None``. Raises ``RuntimeError`` for a family with a ``skip`` reason."""
        if self.skip:
            raise RuntimeError(f"the tiny {self.name} pipeline is not built: {self.skip}")
        cls = self.pipeline_class
        models = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for name, component in self.components.items():
                models[name] = _cast(component.build().eval(), dtype)
        arguments = {name: None for name in inspect.signature(cls.__init__).parameters if name != "self"}
        pipe = cls(**{**arguments, **self.pipeline_kwargs, **models})
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _family(name: str, pipeline: str, denoiser: Component, formats: tuple[str, ...], *, text_encoders:
            Mapping[str, Component] = {}, denoiser_name: str = "transformer", extra: Mapping[str, Component] = {},
            **kwargs: Any) -> Family:  # noqa: B006
    adapted = (denoiser_name, *text_encoders)
    return Family(name, pipeline, {denoiser_name: denoiser, **text_encoders, **extra}, formats, adapted, **kwargs)


FAMILIES: dict[str, Family] = {f.name: f for f in [
    _family("sd", "StableDiffusionPipeline", diffusers_model("UNet2DConditionModel", **UNET),
            ("peft", "metadata", "kohya"), denoiser_name="unet",
            text_encoders={"text_encoder": clip()}),
    _family("sdxl", "StableDiffusionXLPipeline", diffusers_model(
        "UNet2DConditionModel", **{**UNET, "cross_attention_dim": 32}, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=64),  # 6 · addition_time_embed_dim + text_encoder_2's projection
            ("peft", "metadata", "kohya_sdxl"), denoiser_name="unet",
            text_encoders={"text_encoder": clip(), "text_encoder_2": clip("CLIPTextModelWithProjection")}),
    _family("sd3", "StableDiffusion3Pipeline", diffusers_model(
        "SD3Transformer2DModel", sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=32,
        out_channels=4), ("peft", "metadata"),
            text_encoders={"text_encoder": clip("CLIPTextModelWithProjection"),
                           "text_encoder_2": clip("CLIPTextModelWithProjection")}),
    _family("flux", "FluxPipeline", diffusers_model("FluxTransformer2DModel", **FLUX, pooled_projection_dim=16,
                                                    guidance_embeds=True),
            ("peft", "peft_alpha", "metadata", "kohya_flux", "xlabs", "onetrainer"),
            text_encoders={"text_encoder": clip()}),
    _family("flux_kontext", "FluxKontextPipeline", diffusers_model(
        "FluxTransformer2DModel", **FLUX, pooled_projection_dim=16, guidance_embeds=True),
            ("peft", "peft_alpha", "metadata", "kohya_flux", "xlabs", "onetrainer"),
            text_encoders={"text_encoder": clip()}),
    _family("chroma", "ChromaPipeline", diffusers_model(
        "ChromaTransformer2DModel", **FLUX, approximator_hidden_dim=16, approximator_layers=1,
        approximator_num_channels=16), ("peft", "peft_alpha", "metadata", "kohya_flux", "xlabs", "onetrainer")),
    _family("wan", "WanPipeline", diffusers_model("WanTransformer3DModel", **WAN),
            ("peft", "metadata", "wan_original", "musubi")),
    _family("wan22", "WanPipeline", diffusers_model("WanTransformer3DModel", **WAN),
            ("peft", "metadata", "wan_original", "musubi"),
            extra={"transformer_2": diffusers_model("WanTransformer3DModel", **WAN)},
            pipeline_kwargs={"boundary_ratio": 0.875}),  # Wan 2.2 A14B's model_index.json
    _family("qwen_image", "QwenImagePipeline", diffusers_model(
        "QwenImageTransformer2DModel", patch_size=2, in_channels=16, out_channels=4, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False,
        axes_dims_rope=(8, 4, 4)), ("peft", "metadata", "qwen_unprefixed", "kohya_qwen", "diffusion_model")),
    _family("hunyuan_video", "HunyuanVideoPipeline", diffusers_model(
        "HunyuanVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)), ("peft", "metadata", "hunyuan_original")),
    _family("sana", "SanaPipeline", diffusers_model(
        "SanaTransformer2DModel", patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2,
        attention_head_dim=8, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=8, sample_size=32), ("peft", "metadata")),
    _family("lumina2", "Lumina2Pipeline", diffusers_model(
        "Lumina2Transformer2DModel", sample_size=4, patch_size=2, in_channels=4, hidden_size=16, num_layers=2,
        num_refiner_layers=1, num_attention_heads=2, num_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None,
        norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=(4, 2, 2), cap_feat_dim=8), ("peft", "metadata")),
    _family("cogview4", "CogView4Pipeline", diffusers_model(
        "CogView4Transformer2DModel", patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, out_channels=4, text_embed_dim=32, time_embed_dim=8, condition_dim=4),
            ("peft", "metadata")),
    _family("hidream", "HiDreamImagePipeline", diffusers_model(
        "HiDreamImageTransformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=1,
        num_single_layers=1, attention_head_dim=8, num_attention_heads=2, caption_channels=(32, 16), text_emb_dim=64,
        num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(4, 4), max_resolution=(32, 32),
        llama_layers=(0, 1)), ("peft", "metadata", "diffusion_model")),
    _family("ltx_video", "LTXPipeline", diffusers_model(
        "LTXVideoTransformer3DModel", in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
        num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, num_layers=1, caption_channels=32),
            ("peft", "metadata", "diffusion_model")),
    _family("mochi", "MochiPipeline", diffusers_model(
        "MochiTransformer3DModel", patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        pooled_projection_dim=16, in_channels=12, out_channels=None, qk_norm="rms_norm", text_embed_dim=32,
        time_embed_dim=4, activation_fn="swiglu", max_sequence_length=16), ("peft", "metadata")),
    _family("cogvideox", "CogVideoXPipeline", diffusers_model(
        "CogVideoXTransformer3DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        time_embed_dim=2, text_embed_dim=32, num_layers=1, sample_width=16, sample_height=16, sample_frames=9,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=16), ("peft", "metadata")),
    _family("auraflow", "AuraFlowPipeline", diffusers_model(
        "AuraFlowTransformer2DModel", sample_size=64, patch_size=1, in_channels=4, num_mmdit_layers=1,
        num_single_dit_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=32, pos_embed_max_size=64), ("peft", "metadata")),
]}


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` in ``dtype``, except the modules it keeps in float32 (``_keep_in_fp32_modules``: Wan's norms and
    time embedder), as ``from_pretrained(torch_dtype=dtype)`` leaves them."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    torch.nn.Module.to(model, dtype)  # not ModelMixin.to, which warns about the float32 modules it would cast
    for name, parameter in itertools.chain(model.named_parameters(), model.named_buffers()):
        if keep & set(name.split(".")) and parameter.is_floating_point():
            parameter.data = parameter.data.float()
    return model
