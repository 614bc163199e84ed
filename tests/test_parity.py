"""Parity as the rule: between identical models, ``load_lora_weights_cross`` leaves a pipeline as plain
``load_lora_weights`` leaves it, for every tiny family of :mod:`diffusers_lorax.tiny`, every LoRA format diffusers
reads for it, and float32 / float16 / bfloat16.

Per case three pipelines are built from one seed (``plain``, ``cross``, and ``source``, the cross load's source);
``plain.load_lora_weights(file, adapter_name="a")`` and ``cross.load_lora_weights_cross(source, file,
adapter_name="a")`` load the same random LoRA file, and every PEFT layer's effective update ``ΔW = s · B A`` (``s`` =
the layer's ``scaling["a"]``, conv weights flattened, float64) is compared.

What is asserted, and why:
- the pipeline lists the same adapters per component, and the same active ones, with the same PEFT config key for
  key (what ``hotswap`` compares and ``save_lora_weights`` writes; text encoders' target names up to CLIP's
  ``text_model.`` level, see ``_comparable``);
- the adapted modules are the same set, exactly (component and module name);
- every layer holds bit-identical factors (same values, dtype and device) and the same ``scaling``: the cross load
  hands diffusers the LoRA's own factors and each module's own ``lora_alpha`` (``injection.py``), so nothing is
  rounded differently, in any dtype. (Exactness is the arithmetic here: the same tensors through the same code. A
  load that folded ``alpha / r`` into ``lora_B`` would round it once more: 2⁻²⁴, 2⁻¹¹, 2⁻⁸ relative per element in
  float32 / float16 / bfloat16, which this test would catch.) The relative difference of ``ΔW = s · B A`` is
  recorded per case, and must then be 0.

The three pipelines of a (family, dtype) are built once per module and unloaded (``unload_lora_weights``) after
each case, which restores their modules, so every case starts from plain models.
"""

import pytest
import torch

from diffusers_lorax.tiny import FAMILIES
from diffusers_lorax.tiny.loras import save_random_lora

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

CASES = [pytest.param(name, fmt, {}, id=f"{name}-{fmt}") for name, spec in FAMILIES.items() if not spec.skip
         for fmt in spec.formats]
#: Wan 2.2's second expert: the same files loaded with load_into_transformer_2=True.
CASES += [pytest.param("wan22", fmt, {"load_into_transformer_2": True}, id=f"wan22-{fmt}-load_into_transformer_2")
          for fmt in FAMILIES["wan22"].formats]


@pytest.fixture(scope="module")
def pipelines():
    built = {}

    def get(family, dtype):
        if (family, dtype) not in built:
            built[family, dtype] = tuple(FAMILIES[family].build(dtype) for _ in range(3))
        return built[family, dtype]

    return get


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return lambda family, fmt: save_random_lora(folder, family, fmt)


def lora_layers(pipe, components, adapter="a"):
    """``{(component, module): (B, A, scaling)}`` of every PEFT layer holding ``adapter``."""
    found = {}
    for component in components:
        model = getattr(pipe, component, None)
        for name, module in model.named_modules() if model is not None else ():
            if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and adapter in module.lora_A:
                found[component, name] = (module.lora_B[adapter].weight, module.lora_A[adapter].weight,
                                          float(module.scaling[adapter]))
    return found


def _comparable(config):
    """A PEFT config's dict, its ``target_modules`` named without CLIP's ``text_model.`` level: diffusers keeps that
    level in a ``CLIPTextModelWithProjection``'s targets (which still has it) and the cross load names them
    canonically; both name the same modules (PEFT matches target names as suffixes), nothing else differs."""
    out = config.to_dict()
    out["target_modules"] = sorted(m.removeprefix("text_model.") for m in out["target_modules"])
    return out


def update(B, A, s):
    """ΔW = s · B A in float64, ``(out, in·kh·kw)``."""
    return s * B.detach().double().reshape(B.shape[0], -1) @ A.detach().double().reshape(A.shape[0], -1)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("family, fmt, load_kwargs", CASES)
def test_cross_load_between_identical_models_equals_plain_load(pipelines, lora_files, family, fmt, load_kwargs, dtype,
                                                               record_property):
    plain, cross, source = pipelines(family, dtype)
    lora, components = str(lora_files(family, fmt)), tuple(FAMILIES[family].components)
    try:
        plain.load_lora_weights(lora, adapter_name="a", **load_kwargs)
        cross.load_lora_weights_cross(source, lora, adapter_name="a", **load_kwargs)
        expected, found = lora_layers(plain, components), lora_layers(cross, components)
        assert expected, "plain load_lora_weights adapted nothing"
        assert cross.get_list_adapters() == plain.get_list_adapters()
        assert cross.get_active_adapters() == plain.get_active_adapters()
        for component in components:  # the same PEFT config, key for key (hotswap and save_lora_weights read it)
            configs = [getattr(getattr(pipe, component, None), "peft_config", None) or {} for pipe in (plain, cross)]
            assert [_comparable(c) for c in configs[0].values()] == [_comparable(c) for c in configs[1].values()], \
                component
        assert found.keys() == expected.keys(), (
            f"adapted modules differ: only plain {sorted(expected.keys() - found.keys())[:3]}…, only cross "
            f"{sorted(found.keys() - expected.keys())[:3]}…")
        differences = {}
        for key, (B, A, s) in expected.items():
            Bc, Ac, sc = found[key]
            assert (Bc.dtype, Ac.dtype, Bc.device, Ac.device) == (B.dtype, A.dtype, B.device, A.device), key
            reference = update(B, A, s)
            differences[key] = float((update(Bc, Ac, sc) - reference).norm() / reference.norm())
        worst = max(differences, key=differences.get)
        record_property("max_relative_difference", differences[worst])  # for the junit report
        different = [key for key, (B, A, s) in expected.items()
                     if not (torch.equal(found[key][0], B) and torch.equal(found[key][1], A) and found[key][2] == s)]
        assert not different, (f"{len(different)}/{len(expected)} layers differ from plain's, e.g. "
                               f"{'.'.join(different[0])}; worst relative difference of ΔW {differences[worst]:.3g}")
    finally:
        for pipe in (plain, cross):
            pipe.unload_lora_weights()
            assert not lora_layers(pipe, components), "unload_lora_weights left PEFT layers"
