"""Tiny pipelines that run end to end from prompts: a family's pipeline (:mod:`diffusers_lorax.tiny`) with the
tokenizers, the text encoders no LoRA adapts and the scheduler it lacks, all built offline (byte-level or
character-level tokenizers, random text encoders of the width the denoiser reads, seeded). The VAE stays ``None``:
these pipelines are run with ``output_type="latent"``.

:data:`RUNNABLE` lists the families this completes; any other family's pipeline still needs a text encoder built
here (Gemma, Llama, GLM, Mistral, Qwen 3 …) and is not run by the tests.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from . import FAMILIES
from .. import toy

#: A T5 / UMT5 encoder as wide as every tiny family's text input (``joint_attention_dim`` = ``text_dim`` = 32).
T5 = dict(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, vocab_size=64, relative_attention_num_buckets=8,
          relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0,
          eos_token_id=1, decoder_start_token_id=0)
#: Qwen-Image's text encoder (Qwen 2.5-VL) as diffusers' own tests build it, 16 wide (``joint_attention_dim``).
QWEN = dict(text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default"},
                             rope_theta=1e6, vocab_size=300, bos_token_id=0, eos_token_id=1),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
            vocab_size=300, vision_start_token_id=297, vision_end_token_id=298, vision_token_id=299, image_token_id=296,
            video_token_id=295, bos_token_id=0, eos_token_id=1)
RUNNABLE = ("sd", "sdxl", "sd3", "sd35", "flux", "flux_kontext", "chroma", "wan", "wan22", "qwen_image", "ltx_video",
            "mochi", "auraflow")


def build(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """The tiny pipeline of family ``name`` (one of :data:`RUNNABLE`) as ``FAMILIES[name].build(dtype, seed)`` makes
    it, completed so that ``pipe(prompt, output_type="latent", ...)`` runs. Raises ``KeyError`` for another family."""
    if name not in RUNNABLE:
        raise KeyError(f"the tiny {name} pipeline cannot run from prompts; runnable: {RUNNABLE}")
    pipe = FAMILIES[name].build(dtype, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        for component, value in _missing(name).items():
            if isinstance(value, torch.nn.Module):
                value = value.eval().to(dtype)
            setattr(pipe, component, value)  # DiffusionPipeline.__setattr__ registers it
    return pipe


def _missing(name: str) -> dict[str, Any]:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    if name == "sd":
        return dict(tokenizer=toy.byte_tokenizer(), scheduler=DDIMScheduler(**toy.SCHEDULER, clip_sample=False))
    if name == "sdxl":
        return dict(tokenizer=toy.byte_tokenizer(), tokenizer_2=toy.byte_tokenizer(),
                    scheduler=EulerDiscreteScheduler(**toy.SCHEDULER))
    flow = FlowMatchEulerDiscreteScheduler()
    if name in ("sd3", "sd35"):  # T5 (text_encoder_3) is optional: SD3 reads zeros in its place
        return dict(tokenizer=toy.byte_tokenizer(), tokenizer_2=toy.byte_tokenizer(), scheduler=flow)
    if name in ("flux", "flux_kontext"):
        return dict(tokenizer=toy.byte_tokenizer(), tokenizer_2=_t5_tokenizer(), text_encoder_2=_t5(), scheduler=flow)
    if name == "chroma":
        return dict(tokenizer=_t5_tokenizer(), text_encoder=_t5(), scheduler=flow)
    if name in ("wan", "wan22"):
        return dict(tokenizer=_t5_tokenizer(), text_encoder=_t5("UMT5EncoderModel", "UMT5Config"), scheduler=flow)
    if name in ("ltx_video", "mochi"):
        return dict(tokenizer=_t5_tokenizer(), text_encoder=_t5(), scheduler=flow)
    if name == "auraflow":
        return dict(tokenizer=_t5_tokenizer(), text_encoder=_t5("UMT5EncoderModel", "UMT5Config"), scheduler=flow)
    return dict(tokenizer=_byte_bpe(), text_encoder=_qwen(), scheduler=flow)  # qwen_image


def _t5_tokenizer() -> Any:
    from transformers import T5TokenizerFast

    with tempfile.TemporaryDirectory(prefix="lorax-t5-") as folder:
        toy.write_t5_tokenizer(folder)
        return T5TokenizerFast.from_pretrained(folder)


def _t5(model: str = "T5EncoderModel", config: str = "T5Config") -> torch.nn.Module:
    import transformers

    return getattr(transformers, model)(getattr(transformers, config)(**T5))


def _byte_bpe() -> Any:
    """A byte-level tokenizer (256 ids, no merges, pad = 0) for a Qwen text encoder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    model = Tokenizer(models.BPE({s: i for i, s in enumerate(alphabet)}, []))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token=alphabet[0])


def _qwen() -> torch.nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN))
