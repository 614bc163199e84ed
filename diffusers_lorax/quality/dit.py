"""The DiT testbed: small Flux-shaped pipelines on the same digits, prompts and trigger word as the UNet testbed
(``data.py``), scored by its classifiers; built by ``benchmarks/quality/build_dit.py`` (docs/quality.md).

- ``source``: a ``FluxPipeline`` — ``FluxTransformer2DModel`` with Flux.1's 19 double (joint) blocks and 4 single
  blocks at width 32, CLIP (pooled) and T5 (sequence) text encoders, flow matching (Euler), no guidance embedding
  (Flux.1 [schnell]'s layout), true classifier-free guidance at sampling;
- ``target-finetune``: the source transformer trained further on thick strokes;
- ``target-flex``: a Flex.1-style student: 8 double blocks, initialised by the published Flex map
  (:data:`FLEX_KEPT`: teacher blocks 0–4 stay, 5–15 are dropped, 16–18 move to 5–7), then distilled;
- ``target-chroma``: a ``ChromaPipeline`` — ``ChromaTransformer2DModel``, whose blocks have no modulation projections
  (``norm1.linear``, ``norm1_context.linear``, ``norm.linear``, ``norm_out.linear``: one small approximator makes
  every block's modulation from the timestep alone), T5 only (no CLIP); initialised from the source by name, the
  approximator fitted to the source's modulations, then distilled.

The VAE is the UNet testbed's (16×16×3 → 8×8×4), with Flux's ``shift_factor``; the transformer sees its latents as
Flux packs them: 2×2 patches, 16 tokens of 16 channels.
"""

from __future__ import annotations

from pathlib import Path

from . import data

#: Where the trained DiT testbed lives (beside the UNet testbed's ``assets``).
DIT_ASSETS = Path(__file__).resolve().parent / "assets_dit"
MODELS = ("source", "target-finetune", "target-flex", "target-chroma")
#: The compact LoRA-X slant adapter trained on each model (``examples/train_lorax.py --testbed dit``, diagonal core,
#: r = min(m, n); docs/quality.md, "The DiT testbed"), relative to :data:`DIT_ASSETS`, and how its file names the model
#: it was trained on (a local label, not a Hub id: loaders pass the model folder as ``source``).
LORAX = "loras/lorax-slant-{}.safetensors"
LORAX_LABEL = "diffusers-lorax DiT digits testbed: {}"
#: The pipeline class of each model (``model_index.json`` says it too).
PIPELINES = {"source": "FluxPipeline", "target-finetune": "FluxPipeline", "target-flex": "FluxPipeline",
             "target-chroma": "ChromaPipeline"}

#: Flux.1's depth of double blocks, so that the published Flex map applies as it is.
DOUBLE_BLOCKS = 19
#: The Flex.1 map (ostris' Flex LoRA loader, ComfyUI-FlexTools): the teacher's double block of each student block.
#: 8 of 19 kept: 0–4 in place, 5–15 dropped, 16, 17, 18 moved to 5, 6, 7; single blocks kept by name.
FLEX_KEPT = (0, 1, 2, 3, 4, 16, 17, 18)

T5 = dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
          relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0,
          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
_DIT = dict(patch_size=1, in_channels=4 * data.VAE["latent_channels"], num_layers=DOUBLE_BLOCKS, num_single_layers=4,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5["d_model"], axes_dims_rope=(4, 6, 6))
TRANSFORMER = dict(_DIT, pooled_projection_dim=data.TEXT_ENCODER["hidden_size"], guidance_embeds=False)
STUDENT = dict(TRANSFORMER, num_layers=len(FLEX_KEPT))
CHROMA = dict(_DIT, approximator_num_channels=64, approximator_hidden_dim=64, approximator_layers=2)
#: Flux.1 [schnell]'s scheduler: no resolution-dependent shift.
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)

