"""``lorax inspect`` / inspect_lora: the format, layers, ranks, alphas, family and metadata of SD 1.x, SD 2.x and SDXL
LoRA files of every supported format (written here with the real architectures' layer shapes, to each format's
documented key scheme), and with a target which layers would apply, before anything is loaded."""

import json
import time

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from diffusers_lorax import UnsupportedFormatError, inspect_lora, toy
from diffusers_lorax.architectures.unet import KNOWN_UNETS
from diffusers_lorax.cli import main
from diffusers_lorax.formats.skeleton import meta_unet
from diffusers_lorax.registry.families import families

from helpers import find_modules_v2, save_toy_pair

LABELS = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL"}
OTHER = {"sd1": "sdxl", "sd2": "sd1", "sdxl": "sd2"}
#: The layers the test LoRAs adapt: cross-attention (whose input width tells the families apart), projections and
#: resnet convs (3×3 kernels) of the UNet; attention and MLP of the text encoders. A subset keeps the SDXL files
#: small; family identification compares whatever layers a file has.
UNET_TARGETS = ("attn2.to_k", "attn2.to_v", "attn2.to_out.0", "proj_in", "conv1")
TE_TARGETS = ("q_proj", "fc1")
FORMATS = ["peft", "kohya", "loha", "lokr", "lora_diffusion", "lora-x"]


def family(name):
    return next(f for f in families() if f.name == name)


def peft_lora(name, rank=4, seed=0):
    """A PEFT-format LoRA (``<component>.<module>.lora_A/B.weight``) on the attention, feed-forward, projection and
    resnet conv layers of the family's UNet and the attention and MLP layers of its text encoders, real shapes."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for component, shapes in family(name).shapes.items():
        targets = UNET_TARGETS if component == "unet" else TE_TARGETS
        for module, shape in shapes.items():
            if module.endswith(targets):
                prefix = f"{component}.{module if component == 'unet' else 'text_model.' + module}"
                out[f"{prefix}.lora_A.weight"] = torch.randn(rank, *shape[1:], generator=gen)
                out[f"{prefix}.lora_B.weight"] = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []),
                                                             generator=gen)
    return out


def lycoris_lora(name, algo, rank=4):
    """LyCORIS keys (lycoris-lora's layout, kohya names) with the family's shapes, conv kernels stored flattened as
    LyCORIS does without a Tucker core: LoHa ``hada_w{1,2}_a`` ``(out, r)``, ``hada_w{1,2}_b`` ``(r, in·kh·kw)``; LoKr
    ``lokr_w1`` ``(4, 4)``, ``lokr_w2_a`` ``(out/4, r)``, ``lokr_w2_b`` ``(r, in·kh·kw/4)``; alpha 2."""
    kohya = toy.to_kohya(peft_lora(name, rank), sdxl=name == "sdxl")
    out = {}
    for key, down in kohya.items():
        if not key.endswith(".lora_down.weight"):
            continue
        prefix = key.removesuffix(".lora_down.weight")
        m, n = kohya[f"{prefix}.lora_up.weight"].shape[0], down[0].numel()
        if algo == "loha":
            for i in (1, 2):
                out[f"{prefix}.hada_w{i}_a"], out[f"{prefix}.hada_w{i}_b"] = torch.ones(m, rank), torch.ones(rank, n)
        else:
            out[f"{prefix}.lokr_w1"] = torch.ones(4, 4)
            out[f"{prefix}.lokr_w2_a"], out[f"{prefix}.lokr_w2_b"] = torch.ones(m // 4, rank), torch.ones(rank, n // 4)
        out[f"{prefix}.alpha"] = torch.tensor(2.0)
    return out


def sgm_names(kohya):
    """The attention layers of an SDXL kohya LoRA under kohya's own SDXL UNet block names (``input_blocks_4_1_…``,
    ``middle_block_1_…``, ``output_blocks_0_1_…``), as sd-scripts writes them; other layers dropped."""
    import re

    out = {}
    for key, value in kohya.items():
        name = re.sub(r"^lora_unet_down_blocks_(\d)_attentions_(\d)_",
                      lambda m: f"lora_unet_input_blocks_{3 * int(m[1]) + int(m[2]) + 1}_1_", key)
        name = re.sub(r"^lora_unet_up_blocks_(\d)_attentions_(\d)_",
                      lambda m: f"lora_unet_output_blocks_{3 * int(m[1]) + int(m[2])}_1_", name)
        name = name.replace("lora_unet_mid_block_attentions_0_", "lora_unet_middle_block_1_")
        if name != key or key.startswith("lora_te"):
            out[name] = value
    return out


def lora_diffusion_lora(name, rank=3):
    """``(tensors, metadata)`` of a lora_diffusion safetensors file (``<model>:<i>:up/down``, target classes and
    ranks in the metadata, a ``<s1>`` token) over the family's UNet and first text encoder, default targets."""
    from transformers import CLIPTextConfig, CLIPTextModel

    te = family(name).shapes["text_encoder"]
    width, depth = te["encoder.layers.0.self_attn.q_proj"][0], 1 + max(int(k.split(".")[2]) for k in te)
    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=1,
                                            intermediate_size=te["encoder.layers.0.mlp.fc1"][0]))
    tensors, metadata = {"<s1>": torch.ones(width)}, {"<s1>": "<embed>"}
    for model, tree, classes in (("unet", meta_unet(KNOWN_UNETS[name]), ["CrossAttention", "Attention", "GEGLU"]),
                                 ("text_encoder", clip, ["CLIPAttention"])):
        metadata[model] = json.dumps(classes)
        for i, (_, module) in enumerate(find_modules_v2(tree, {"Attention", "GEGLU", "CLIPAttention"}, [torch.nn.Linear])):
            shape = tuple(module.weight.shape)
            tensors[f"{model}:{i}:up"], tensors[f"{model}:{i}:down"] = torch.ones(shape[0], rank), torch.ones(rank, shape[1])
            metadata[f"{model}:{i}:rank"] = str(rank)
    return tensors, metadata


def lorax_lora(name, r=4):
    """A LoRA-X compact file (``adapters/files.py``): per layer a core ``(r,)``; source, ranks, shapes in metadata."""
    layers = {k.removesuffix(".lora_A.weight"): v for k, v in peft_lora(name).items() if k.endswith(".lora_A.weight")}
    shapes = {key: list(family(name).shapes[key.split(".")[0]][key.split(".", 1)[1].removeprefix("text_model.")])
              for key in layers}
    meta = {"source": {"hub_id": family(name).hub_ids[0], "revision": None}, "config": {"r": r}, "standalone": False,
            "layers": {key: {"r": r, "shape": shape, "fingerprint": "0" * 32} for key, shape in shapes.items()}}
    tensors = {f"{key}.lorax_core": torch.ones(r) for key in layers}
    return tensors, {"format": "lora-x", "format_version": "1", "lorax": json.dumps(meta)}


def write(name, fmt, path):
    """Write the family's LoRA in ``fmt``; return ``(format shown, layers, ranks)``."""
    metadata = {}
    if fmt == "peft":
        tensors, shown, ranks = peft_lora(name), "peft", {4}
    elif fmt == "kohya":
        tensors, shown, ranks = toy.to_kohya(peft_lora(name), sdxl=name == "sdxl"), "kohya", {4}
    elif fmt == "kohya-sgm":
        tensors, shown, ranks = sgm_names(toy.to_kohya(peft_lora(name), sdxl=True)), "kohya", {4}
    elif fmt in ("loha", "lokr"):
        tensors, shown, ranks = lycoris_lora(name, fmt), "LyCORIS", {4}
    elif fmt == "lora_diffusion":
        (tensors, metadata), shown, ranks = lora_diffusion_lora(name), "lora_diffusion", {3}
    else:
        (tensors, metadata), shown, ranks = lorax_lora(name), "LoRA-X (compact)", {4}
    save_file(tensors, path, metadata=metadata)
    one_per_layer = {"peft": ".lora_A.weight", "kohya": ".lora_down.weight", "kohya-sgm": ".lora_down.weight",
                     "loha": ".alpha", "lokr": ".alpha", "lora_diffusion": ":up", "lora-x": ".lorax_core"}[fmt]
    return shown, sum(key.endswith(one_per_layer) for key in tensors), ranks


def meta_pipeline(name):
    """A pipeline of the family's real architecture on the meta device (no memory): its UNet from the family's
    config, its text encoders as meta modules of the catalogued shapes."""
    cls = StableDiffusionXLPipeline if name == "sdxl" else StableDiffusionPipeline
    components = {component: toy.meta_modules(shapes) for component, shapes in family(name).shapes.items()
                  if component != "unet"}
    return toy.meta_pipeline(cls, {"unet": meta_unet(KNOWN_UNETS[name]), **components})


def test_known_unet_configs_reproduce_the_registry_shapes():
    for name, config in KNOWN_UNETS.items():
        tree = meta_unet(config)
        shapes = {n: tuple(m.weight.shape) for n, m in tree.named_modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        assert shapes == family(name).shapes["unet"], name


@pytest.mark.parametrize("name, fmt", [(name, fmt) for fmt in FORMATS for name in ("sd1", "sd2", "sdxl")]
                         + [("sdxl", "kohya-sgm")])  # kohya's own UNet block names are an SDXL naming
def test_inspect_answers_for_every_family_and_format(name, fmt, tmp_path):
    path = tmp_path / f"{name}-{fmt}.safetensors"
    shown, n, ranks = write(name, fmt, path)
    found = inspect_lora(path)
    assert found.format == shown and found.layers == n and set(found.ranks) == ranks, found
    assert found.family is not None and found.family.startswith(LABELS[name]), found
    assert found.verdict == f"a {LABELS[name]} LoRA: use it with a {LABELS[name]} model"
    if fmt in ("loha", "lokr"):
        assert found.algorithms == {f"LyCORIS {'LoHa' if fmt == 'loha' else 'LoKr'}": n} and found.alphas == {2.0: n}
    if fmt == "lora_diffusion":
        assert any("<s1>" in note for note in found.notes) and found.alphas == {"none": n}
    if fmt == "lora-x":
        assert found.base_model["lora-x source"] == family(name).hub_ids[0]
        assert [n for n in found.notes if n.startswith("LoRA-X rank option r = 4 ")], found.notes
    on_same = inspect_lora(path, meta_pipeline(name))
    assert len(on_same.applies) == n and not on_same.skipped and on_same.verdict.startswith(f"all {n} layers apply")
    on_other = inspect_lora(path, meta_pipeline(OTHER[name]))
    assert on_other.verdict.startswith(f"will not apply: this LoRA is for {LABELS[name]}, the target ")
    assert f"is {LABELS[OTHER[name]]}" in on_other.verdict and "\n" not in on_other.verdict and not on_other.applies


def test_inspect_of_a_local_file_takes_well_under_a_second(tmp_path):
    """An SDXL kohya LoRA (UNet and both text encoders), warm process. docs/performance.md#lorax-inspect gives the
    figures of benchmarks/inspect_cost.py on full-size files; the bound leaves a margin for a loaded CI machine."""
    path = tmp_path / "sdxl.safetensors"
    write("sdxl", "kohya", path)
    inspect_lora(path)  # imports and the meta UNet cache
    started, started_cpu = time.perf_counter(), time.process_time()
    found = inspect_lora(path)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    print(f"\ninspect_lora on an SDXL kohya LoRA of {found.layers} layers: {elapsed:.2f} s ({cpu:.2f} s CPU)")
    assert found.family.startswith(LABELS["sdxl"]) and elapsed < 2.0


def test_metadata_naming_another_base_is_reported(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file(toy.to_kohya(peft_lora("sd1")), path, metadata={"ss_base_model_version": "sdxl_base_v1-0",
                                                              "ss_sd_model_name": "sd_xl_base_1.0.safetensors"})
    found = inspect_lora(path)
    assert found.base_model == {"ss_base_model_version": "sdxl_base_v1-0",
                                "ss_sd_model_name": "sd_xl_base_1.0.safetensors"}
    assert ("the metadata says ss_base_model_version=sdxl_base_v1-0, but the layer shapes fit Stable Diffusion 1.x: "
            "the shapes are trusted") in found.notes[0]


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    """``(root, lora)``: the toy source and target folders, a kohya LoRA (alpha 8, rank 4) on the source's to_q,
    to_k and resnet conv1 layers, and a shallower target (one layer per block)."""
    root = tmp_path_factory.mktemp("inspect")
    source = save_toy_pair(root)
    lora = toy.random_lora(source, rank=4, seed=2, targets=("to_q", "to_k", "conv1"), components=("unet",))
    save_file(toy.to_kohya(lora, {k.removesuffix(".lora_A.weight"): 8.0 for k in lora if "lora_A" in k}),
              root / "lora.safetensors")
    toy.sd_pipeline(dict(toy.TINY_SD_UNET, layers_per_block=1), seed=3).save_pretrained(root / "shallow")
    return root, lora


def test_layers_that_would_not_apply_are_listed_with_the_reason(toy_files):
    from diffusers import UNet2DConditionModel

    root, lora = toy_files
    n = sum(k.endswith("lora_A.weight") for k in lora)
    shallow = {name: tuple(m.weight.shape) for name, m in
               UNet2DConditionModel.from_pretrained(root / "shallow" / "unet").named_modules() if hasattr(m, "weight")}
    expected = sorted(k.removesuffix(".lora_A.weight") for k, A in lora.items() if k.endswith("lora_A.weight") and
                      shallow.get(k[5:].removesuffix(".lora_A.weight")) ==
                      (lora[k.replace("lora_A", "lora_B")].shape[0], *A.shape[1:]))
    found = inspect_lora(root / "lora.safetensors", root / "shallow")
    assert found.layers == n and found.ranks == {4: n} and found.alphas == {8.0: n}
    assert sorted(found.applies) == expected and 0 < len(expected) < n
    assert set(found.skipped) == {"no module of this name in the target", "shape differs in the target"}
    assert sum(len(names) for names in found.skipped.values()) == n - len(expected)
    assert found.verdict.startswith(f"{len(expected)} of {n} layers apply")


def test_cli_inspect_prints_findings_and_json(toy_files, capsys):
    root, lora = toy_files
    n = sum(k.endswith("lora_A.weight") for k in lora)
    assert main(["inspect", str(root / "lora.safetensors"), "--target", str(root / "target")]) == 0
    printed = capsys.readouterr().out
    assert "format: kohya" in printed and f"{n} of {n} layers would apply" in printed
    assert f"verdict: all {n} layers apply" in printed and len(printed.splitlines()) <= 12
    assert main(["inspect", str(root / "lora.safetensors"), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["layers"] == n and found["components"] == {"unet": n} and found["format"] == "kohya"


def test_cli_inspect_refused_format_is_one_line_and_exit_2(tmp_path, capsys):
    torch.save([torch.ones(4, 2), torch.ones(2, 4)], tmp_path / "lora.pt")
    assert main(["inspect", str(tmp_path / "lora.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorax: error: the LoRA") and "legacy lora_diffusion" in err and len(err.splitlines()) == 1
    with pytest.raises(UnsupportedFormatError):
        inspect_lora(tmp_path / "lora.pt")


def test_known_hub_id_target_answers_offline_from_the_registry(tmp_path):
    """A known Hub id that is not in the (empty, offline) cache: another family is refused in one line without any
    download; the same family is compared with the registry's shapes of that family (the catalogue: no file of the
    target is needed, online or not), and says so."""
    path = tmp_path / "sd1.safetensors"
    shown, n, _ = write("sd1", "kohya", path)
    cache = str(tmp_path / "hf-cache")
    other = inspect_lora(path, "stabilityai/stable-diffusion-xl-base-1.0", cache_dir=cache)
    assert other.verdict == ("will not apply: this LoRA is for Stable Diffusion 1.x, the target "
                             "stabilityai/stable-diffusion-xl-base-1.0 is Stable Diffusion XL")
    same = inspect_lora(path, "stable-diffusion-v1-5/stable-diffusion-v1-5", cache_dir=cache)
    assert len(same.applies) == n and same.verdict.startswith(f"all {n} layers apply")
    assert ("stable-diffusion-v1-5/stable-diffusion-v1-5: compared with Stable Diffusion 1.x's shapes in the "
            "registry's catalogue (no file of it read)") in same.notes


def test_lora_diffusion_file_of_another_architecture_is_read_against_its_source(toy_files, capsys):
    """A cloneofsimo lora_diffusion file trained on the toy UNet, which no known family's UNet enumerates to its
    layers: without a source inspect says to pass one (--source); with the source, or failing that a target of its
    architecture, it reads every layer under the module name that lora_diffusion's own enumeration gives."""
    from test_formats import write_lora_diffusion

    from diffusers_lorax import InvalidLoraError
    from diffusers_lorax.weights import canonical_module

    root, _ = toy_files
    path = root / "lora_diffusion.safetensors"
    deltas = write_lora_diffusion(toy.sd_pipeline(seed=0), path, ["CrossAttention", "Attention", "GEGLU"],
                                  ["CLIPAttention"], [torch.nn.Linear])
    names = sorted(f"{component}.{canonical_module(module)}" for component, module in deltas)
    n = {c: sum(component == c for component, _ in deltas) for c in ("unet", "text_encoder")}
    with pytest.raises(InvalidLoraError) as caught:
        inspect_lora(path)
    message = str(caught.value)
    assert "names its UNet layers only by position, and no UNet inspect knows (Stable Diffusion 1.x, Stable " \
           "Diffusion 2.x, Stable Diffusion XL)" in message
    assert "`lorax inspect LORA --source MODEL` (inspect_lora(lora, source=MODEL))" in message
    found = inspect_lora(path, source=root / "source")
    assert found.format == "lora_diffusion" and found.components == n and found.ranks == {3: len(deltas)}
    with_target = inspect_lora(path, root / "target", source=root / "source")
    assert sorted(with_target.applies) == names and not with_target.skipped
    only_target = inspect_lora(path, root / "target")  # no source: the target's UNet, said in a note
    assert sorted(only_target.applies) == names
    assert any(note.startswith("its layers are named by position, and only the target's UNet fits them")
               for note in only_target.notes), only_target.notes
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "--source MODEL" in err and len(err.splitlines()) == 1
    assert main(["inspect", str(path), "--source", str(root / "source")]) == 0
    assert "format: lora_diffusion" in capsys.readouterr().out
