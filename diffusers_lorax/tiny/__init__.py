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
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, attention_head_dim=8,
            norm_num_groups=8)
SD3 = dict(sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
           caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=32, out_channels=4)


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
    """One LoRA family: ``pipeline`` (a diffusers class name), the ``components`` built (``adapted``: those its
    LoRAs adapt; Wan 2.2's ``transformer_2`` is built but takes a LoRA only with ``load_into_transformer_2``), the
    LoRA ``formats`` diffusers reads for it (names of :data:`diffusers_lorax.tiny.loras.FORMATS`), extra constructor
    arguments (``pipeline_kwargs``, e.g. Wan 2.2's ``boundary_ratio``), and ``skip``: why it is not built, or
    ``None``."""

    name: str
    pipeline: str
    components: Mapping[str, Component] = field(default_factory=dict)
    formats: tuple[str, ...] = ()
    adapted: tuple[str, ...] = ()
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=dict)
    skip: str | None = None

    def __post_init__(self) -> None:
        import diffusers

        if self.skip is None and not hasattr(diffusers, self.pipeline):  # a family newer than the installed release
            object.__setattr__(self, "skip", f"diffusers {diffusers.__version__} has no {self.pipeline}")

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


def _family(name: str, pipeline: str, denoiser: Component, formats: tuple[str, ...], *,
            denoiser_name: str = "transformer", text_encoders: Mapping[str, Component] | None = None,
            extra: Mapping[str, Component] | None = None, **kwargs: Any) -> Family:
    """A family whose LoRAs adapt the denoiser and ``text_encoders`` (any other loadable module, e.g. LTX-2's
    ``connectors``); ``extra``: components built but not adapted."""
    text_encoders, extra = text_encoders or {}, extra or {}
    adapted = (denoiser_name, *text_encoders)
    return Family(name, pipeline, {denoiser_name: denoiser, **text_encoders, **extra}, formats, adapted, **kwargs)


FAMILIES: dict[str, Family] = {f.name: f for f in [
    _family("sd", "StableDiffusionPipeline", diffusers_model("UNet2DConditionModel", **UNET),
            ("peft", "metadata", "kohya"), denoiser_name="unet",
            text_encoders={"text_encoder": clip()}),
    _family("sdxl", "StableDiffusionXLPipeline", diffusers_model(
        "UNet2DConditionModel", **{**UNET, "cross_attention_dim": 32}, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=64),  # 6 · addition_time_embed_dim + text_encoder_2's projection
            ("peft", "metadata", "kohya_sdxl"), denoiser_name="unet",
            text_encoders={"text_encoder": clip(), "text_encoder_2": clip("CLIPTextModelWithProjection")}),
    _family("sd3", "StableDiffusion3Pipeline", diffusers_model("SD3Transformer2DModel", **SD3), ("peft", "metadata"),
            text_encoders={"text_encoder": clip("CLIPTextModelWithProjection"),
                           "text_encoder_2": clip("CLIPTextModelWithProjection")}),
    # SD 3.5 Medium: RMS-norm q/k and a second self-attention (attn2) in its first blocks
    _family("sd35", "StableDiffusion3Pipeline", diffusers_model(
        "SD3Transformer2DModel", **SD3, qk_norm="rms_norm", dual_attention_layers=(0,)), ("peft", "metadata"),
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
        axes_dims_rope=(8, 4, 4)), ("peft", "metadata", "unprefixed_alpha", "kohya_dit", "diffusion_model")),
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
    _family("z_image", "ZImagePipeline", diffusers_model(
        "ZImageTransformer2DModel", all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0,
        t_scale=1000.0, axes_dims=(8, 4, 4), axes_lens=(256, 32, 32)),
            ("peft", "metadata", "unprefixed_alpha", "kohya_dit", "diffusion_model")),
    _family("flux2", "Flux2Pipeline", diffusers_model(
        "Flux2Transformer2DModel", patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4)),
            ("peft", "metadata")),
    _family("skyreels_v2", "SkyReelsV2Pipeline", diffusers_model("SkyReelsV2Transformer3DModel", **WAN),
            ("peft", "metadata", "wan_original", "musubi")),
    _family("helios", "HeliosPipeline", diffusers_model(
        "HeliosTransformer3DModel", **{k: v for k, v in WAN.items() if k != "rope_max_seq_len"}, rope_dim=(4, 4, 4),
        has_multi_term_memory_patch=True, guidance_cross_attn=True, zero_history_timestep=True,
        is_amplify_history=False), ("peft", "metadata", "wan_original", "musubi")),
    _family("kandinsky5", "Kandinsky5T2VPipeline", diffusers_model(
        "Kandinsky5Transformer3DModel", in_visual_dim=16, in_text_dim=16, in_text_dim2=16, time_dim=16,
        out_visual_dim=16, patch_size=(1, 2, 2), model_dim=16, ff_dim=32, num_text_blocks=1, num_visual_blocks=2,
        axes_dims=(1, 1, 2), visual_cond=False, attention_type="regular"), ("peft", "metadata")),
    _family("krea2", "Krea2Pipeline", diffusers_model(
        "Krea2Transformer2DModel", in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3,
        text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=16, num_layerwise_text_blocks=1,
        num_refiner_text_blocks=1, axes_dims_rope=(4, 2, 2), rope_theta=1000.0), ("peft", "metadata"),
            pipeline_kwargs={"patch_size": 2}),
    _family("ace_step", "AceStepPipeline", diffusers_model(
        "AceStepTransformer1DModel", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, in_channels=24, audio_acoustic_hidden_dim=8, patch_size=2,
        rope_theta=10000.0, sliding_window=16), ("peft", "metadata")),
    _family("ltx2", "LTX2Pipeline", diffusers_model(
        "LTX2VideoTransformer3DModel", in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
        num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4,
        audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=1,
        qk_norm="rms_norm_across_heads", caption_channels=32, rope_double_precision=False, rope_type="split"),
            ("peft", "metadata", "diffusion_model"), text_encoders={"connectors": Component(
                "diffusers.pipelines.ltx2", "LTX2TextConnectors", dict(
                    caption_channels=32, text_proj_in_factor=2, video_connector_num_attention_heads=2,
                    video_connector_attention_head_dim=8, video_connector_num_layers=1,
                    video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=2,
                    audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
                    audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32,
                    rope_double_precision=False, rope_type="split"))}),
    _family("cosmos2_5", "Cosmos2_5_PredictBasePipeline", diffusers_model(
        "CosmosTransformer3DModel", in_channels=17, out_channels=16, num_attention_heads=2, attention_head_dim=16,
        num_layers=2, mlp_ratio=2, text_embed_dim=32, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=True, extra_pos_embed_type="learnable"), ("peft", "metadata"),
            skip="its constructor builds a CosmosSafetyChecker when safety_checker is None, which needs the "
                 "cosmos_guardrail package (not installed here; it fetches guardrail models from the Hub)"),
    _family("ernie_image", "ErnieImagePipeline", diffusers_model(
        "ErnieImageTransformer2DModel", hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=64,
        in_channels=16, out_channels=16, text_in_dim=16, rope_axes_dim=(4, 6, 6)),
            ("peft", "metadata", "diffusion_model")),
    _family("ideogram4", "Ideogram4Pipeline", diffusers_model(
        "Ideogram4Transformer2DModel", in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        intermediate_size=32, adaln_dim=16, llm_features_dim=32, rope_theta=10_000, mrope_section=(2, 1, 1)),
            ("peft", "metadata")),
    _family("bria_fibo2", "BriaFibo2Pipeline", diffusers_model(
        "BriaFibo2Transformer2DModel", in_channels=16, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        cap_feat_dim=32, injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8,
        gist_step=4, gist_min_text_len=4, gist_max_text_len=16, axes_dims=(4, 6, 6), axes_lens=(64, 32, 32)),
            ("peft", "metadata")),
    *(Family(name, pipeline, skip="a modular pipeline: its blocks and components come from a Hub repository's "
                                   "modular_model_index.json (init_pipeline); no constructor takes models")
      for name, pipeline in [("flux3", "Flux3ModularPipeline"), ("anima", "AnimaModularPipeline"),
                             ("minimax_h3", "MiniMaxH3ModularPipeline")]),
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
