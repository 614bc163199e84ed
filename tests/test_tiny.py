"""The tiny pipelines and random LoRAs of :mod:`diffusers_lorax.tiny`: seeded builds, every listed format read by
plain ``load_lora_weights`` onto exactly the modules its file names, and the formats' key patterns and shapes equal to
those of real LoRA files (``../shared/realcases/lora_keys``) at full width."""

import json
import re

import pytest
import torch

from diffusers_lorax.tiny import FAMILIES
from diffusers_lorax.tiny.loras import FORMATS, adapted_modules, lora_keys, random_lora, save_random_lora, shapes_of

BUILT = [name for name, spec in FAMILIES.items() if not spec.skip]


def _adapted(pipe, components, adapter="a"):
    return {(c, name) for c in components for name, m in getattr(pipe, c).named_modules()
            if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and adapter in m.lora_A}


@pytest.mark.parametrize("family", BUILT)
def test_builds_are_seeded_and_cast(family):
    spec = FAMILIES[family]
    one, again, other = spec.build(seed=0), spec.build(seed=0), spec.build(seed=1)
    half = spec.build(torch.bfloat16)
    for component in spec.components:
        a, b, c = (getattr(p, component).state_dict() for p in (one, again, other))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component
        assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point()), component
        kept = set(getattr(getattr(half, component), "_keep_in_fp32_modules", None) or ())
        for name, tensor in getattr(half, component).state_dict().items():
            if tensor.is_floating_point():
                expected = torch.float32 if kept & set(name.split(".")) else torch.bfloat16
                assert tensor.dtype == expected, (component, name)
    # the other constructor arguments are None
    assert all(getattr(one, name) is None for name in one.components if name not in spec.components)


FORMAT_CASES = [pytest.param(name, fmt, id=f"{name}-{fmt}") for name in BUILT for fmt in FAMILIES[name].formats]


@pytest.mark.parametrize("family, fmt", FORMAT_CASES)
def test_plain_load_lora_weights_adapts_exactly_the_modules_the_file_names(family, fmt, tmp_path):
    spec = FAMILIES[family]
    path = save_random_lora(tmp_path, family, fmt)
    pipe = spec.build()
    pipe.load_lora_weights(str(path), adapter_name="a")
    named = adapted_modules(family, fmt)
    assert named and _adapted(pipe, spec.components) == named
    if not FORMATS[fmt].metadata:
        sd = random_lora(family, fmt)
        assert {k: tuple(v.shape) for k, v in sd.items()} == lora_keys(family, fmt)


def test_metadata_format_carries_lora_alpha_and_the_alpha_pattern(tmp_path):
    from safetensors import safe_open

    path = save_random_lora(tmp_path, "flux", "metadata", rank=4, alphas=[3.0, 8.0])
    with safe_open(str(path), "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 3.0
    assert set(metadata["transformer.alpha_pattern"].values()) == {8.0}
    pipe = FAMILIES["flux"].build()
    pipe.load_lora_weights(str(path), adapter_name="a")
    scalings = {m.scaling["a"] for m in pipe.transformer.modules() if hasattr(m, "scaling") and "a" in m.scaling}
    assert scalings == {0.75, 2.0}


def test_unlisted_format_is_refused():
    with pytest.raises(ValueError, match="does not read xlabs LoRAs for sd"):
        random_lora("sd", "xlabs")


# --- the formats against real files' key lists, at full width (models on the meta device) -------------------------

def _real_keys(realcases, stem):
    namespace = {}
    exec((realcases / "lora_keys" / f"{stem}.py").read_text(), namespace)  # a literal dict of key → shape
    return {k: tuple(v) for k, v in namespace["state_dict_keys"].items()}


def _patterns(keys):
    """{key with its block indices as {i}: shapes}."""
    found = {}
    for key, shape in keys.items():
        found.setdefault(re.sub(r"(?<=[._])\d+(?=[._])", "{i}", key), set()).add(tuple(shape))
    return found


def _real_config(realcases, path):
    config = json.loads((realcases / "configs" / path).read_text())
    return {k: v for k, v in config.items() if k != "quantization_config"}


def _full_size(realcases, family, config):
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = FAMILIES[family]
    config = _real_config(realcases, config)
    with torch.device("meta"):
        models = {"transformer": getattr(diffusers, config["_class_name"]).from_config(config)}
        if "text_encoder" in spec.adapted:
            te = json.loads((realcases / "configs" / "sd15" / "text_encoder__config.json").read_text())  # CLIP-L
            models["text_encoder"] = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in te.items() if k[0] != "_"}))
    return shapes_of(models)


def _rank(keys):
    return next(shape[0] for key, shape in keys.items() if key.endswith(("down.weight", "lora_A.weight")))


@pytest.mark.parametrize("stem, fmt, drop, exact", [
    # diffusers splits single blocks' linear1 at Flux's full width only, so the tiny format leaves it out
    ("flux_lora_kohya_format", "kohya_flux", "single_blocks_{i}_linear1", True),
    ("flux_lora_kohya_with_te1_format", "kohya_flux", "single_blocks_{i}_linear1", True),
    ("flux_lora_xlabs_format", "xlabs", None, True),
    ("flux_dora_onetrainer_format", "onetrainer", "dora_scale|lora_te2_", False),
    ("flux_lora_diffusers_format", "peft", None, False),
    ("flux_lora_diffusers_no_proj_mlp_format", "peft", None, False),
    ("flux_lora_diffusers_with_norm_out_format", "peft", None, False),
])
def test_flux_formats_have_the_keys_and_shapes_of_real_files(realcases, stem, fmt, drop, exact):
    real = _patterns(_real_keys(realcases, stem))
    real = {k: v for k, v in real.items() if not (drop and re.search(drop, k))}
    keys = lora_keys("flux", fmt, rank=_rank(_real_keys(realcases, stem)),
                     shapes=_full_size(realcases, "flux", "flux1_dev/transformer__config.json"))
    ours = _patterns(keys)
    if not any(k.startswith(("lora_te", "text_encoder.")) for k in real):
        ours = {k: v for k, v in ours.items() if not k.startswith(("lora_te", "text_encoder."))}
    if exact:
        assert ours == real
    else:
        assert {k: ours.get(k) for k in real} == real


@pytest.mark.parametrize("stem, fmt", [("qwen_image_lora_diffusers_format", "unprefixed_alpha"),
                                       ("qwen_image_lora_kohya_format", "kohya_dit")])
def test_qwen_formats_name_the_modules_of_real_files(realcases, stem, fmt):
    """Module names and their (out, in) shapes; the real kohya file stores LoKr factors, ours lora_down/lora_up."""
    real = _real_keys(realcases, stem)
    ours = lora_keys("qwen_image", fmt, rank=4,
                     shapes=_full_size(realcases, "qwen_image", "qwen_image/transformer__config.json"))
    modules = {k.rsplit(".", 1)[0].removesuffix(".lora_down").removesuffix(".lora_up") for k in real}
    shapes = {k.split(".")[0] if fmt == "kohya_dit" else k.rsplit(".", 2)[0]: None for k in ours}
    assert modules <= set(shapes)


@pytest.mark.parametrize("family", [name for name, spec in FAMILIES.items() if spec.skip])
def test_a_family_that_cannot_be_built_says_why(family):
    spec = FAMILIES[family]
    if hasattr(__import__("diffusers"), spec.pipeline):  # else a family of a newer diffusers (``skip`` says so)
        assert any(base.__name__.endswith("LoraLoaderMixin") for base in spec.pipeline_class.__mro__)
    with pytest.raises(RuntimeError, match="is not built: " + re.escape(spec.skip)):
        spec.build()


#: Config keys that set sizes (widths, depths, channels, patch, positions): the only ones the tiny configs change.
SIZES = {"attention_head_dim", "num_attention_heads", "num_layers", "num_single_layers", "num_refiner_layers",
         "in_channels", "out_channels", "joint_attention_dim", "pooled_projection_dim", "caption_projection_dim",
         "text_embed_dim", "text_dim", "ffn_dim", "axes_dims_rope", "rope_axes_dim", "rope_max_seq_len", "patch_size",
         "pos_embed_max_size", "sample_size", "approximator_hidden_dim", "approximator_layers",
         "approximator_num_channels", "dual_attention_layers"}


@pytest.mark.parametrize("family, config", [
    ("flux", "flux1_dev"), ("flux_kontext", "flux1_kontext_dev"), ("chroma", "chroma"), ("qwen_image", "qwen_image"),
    ("hunyuan_video", "hunyuanvideo_t2v"), ("wan", "wan21_t2v_1.3b"), ("wan22", "wan22_t2v_a14b"),
    ("sd3", "sd3_medium"), ("sd35", "sd35_medium")])
def test_tiny_transformers_keep_the_architecture_of_the_real_configs(realcases, family, config):
    import diffusers

    real = _real_config(realcases, f"{config}/transformer__config.json")
    spec = FAMILIES[family].components["transformer"]
    assert spec.model_class == real["_class_name"]
    with torch.device("meta"):
        tiny = getattr(diffusers, spec.model_class)(**spec.config).config

    def same(a, b):
        return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)

    changed = {k for k, v in real.items() if not k.startswith("_") and not same(v, tiny.get(k))}
    assert changed <= SIZES, {k: (real[k], tiny.get(k)) for k in changed - SIZES}
