"""Parity as the rule: between identical models, ``load_lora_weights_cross`` leaves a pipeline as plain
``load_lora_weights`` leaves it, for every tiny family of :mod:`diffusers_lorax.tiny`, every LoRA format diffusers
reads for it, and float32 / float16 / bfloat16.

Per case three pipelines are built from one seed (``plain``, ``cross``, and ``source``, the cross load's source);
``plain.load_lora_weights(file, adapter_name="a")`` and ``cross.load_lora_weights_cross(source, file,
adapter_name="a")`` load the same random LoRA file, and every PEFT layer's effective update ``ΔW = s · B A`` (``s`` =
the layer's ``scaling["a"]``, conv weights flattened, float64) is compared.

What is asserted, and why:
- the pipeline lists the same adapters per component, and the same active ones;
- the adapted modules are the same set, exactly (component and module name);
- each layer's factors have plain's dtypes and devices;
- float32: ``‖ΔW_cross − ΔW_plain‖_F ≤ 1e-5 ‖ΔW_plain‖_F`` per layer (the loads may fold ``s`` into a factor:
  float32 rounding of that product, ≈ 6e-8 relative);
- float16 / bfloat16 (unit roundoff ``u`` = 2⁻¹¹ / 2⁻⁸): both loads round factors to the pipeline's dtype once.
  If they keep the same factors the difference is 0. If one folds the scale into a factor before rounding and the
  other keeps it apart, each factor may differ by up to ``e = 2u + 4u₃₂`` of its magnitude (both sides rounded to
  nearest, plus float32 products), so per layer ``‖ΔW_c − ΔW_p‖_F ≤ |s| (e (‖B‖_F ‖A‖_2 + ‖B‖_2 ‖A‖_F) + e² ‖B‖_F
  ‖A‖_F)`` with plain's ``B``, ``A`` — a bound from the arithmetic, for any BLAS and thread count.

The three pipelines of a (family, dtype) are built once per module and unloaded (``unload_lora_weights``) after
each case, which restores their modules, so every case starts from plain models.
"""

import pytest
import torch

from diffusers_lorax.tiny import FAMILIES
from diffusers_lorax.tiny.loras import save_random_lora

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
U32 = 2.0 ** -24
FLOAT32_TOLERANCE = 1e-5

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


def update(B, A, s):
    """ΔW = s · B A in float64, ``(out, in·kh·kw)``."""
    return s * B.detach().double().reshape(B.shape[0], -1) @ A.detach().double().reshape(A.shape[0], -1)


def tolerance(B, A, s, dtype):
    """The bound of the module docstring on ‖ΔW_c − ΔW_p‖_F / ‖ΔW_p‖_F for plain's factors in ``dtype``."""
    if dtype == torch.float32:
        return FLOAT32_TOLERANCE
    B, A = B.detach().double().reshape(B.shape[0], -1), A.detach().double().reshape(A.shape[0], -1)
    e = 2 * UNIT_ROUNDOFF[dtype] + 4 * U32
    fro, two = torch.linalg.matrix_norm, lambda M: torch.linalg.matrix_norm(M, ord=2)
    bound = abs(s) * (e * (fro(B) * two(A) + two(B) * fro(A)) + e * e * fro(B) * fro(A))
    return float(bound / update(B, A, s).norm())


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
        assert found.keys() == expected.keys(), (
            f"adapted modules differ: only plain {sorted(expected.keys() - found.keys())[:3]}…, only cross "
            f"{sorted(found.keys() - expected.keys())[:3]}…")
        differences = {}
        for key, (B, A, s) in expected.items():
            Bc, Ac, sc = found[key]
            assert (Bc.dtype, Ac.dtype, Bc.device, Ac.device) == (B.dtype, A.dtype, B.device, A.device), key
            reference = update(B, A, s)
            differences[key] = (float((update(Bc, Ac, sc) - reference).norm() / reference.norm()),
                                tolerance(B, A, s, dtype))
        over = {k: v for k, v in differences.items() if v[0] > v[1]}
        worst = max(differences, key=lambda k: differences[k][0])
        record_property("max_relative_difference", differences[worst][0])  # for the junit report
        assert not over, (f"relative difference {differences[worst][0]:.3g} at {'.'.join(worst)} (tolerance "
                          f"{differences[worst][1]:.3g}); {len(over)}/{len(differences)} layers over")
    finally:
        for pipe in (plain, cross):
            pipe.unload_lora_weights()
            assert not lora_layers(pipe, components), "unload_lora_weights left PEFT layers"
