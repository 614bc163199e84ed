"""The transformer (DiT) families of ``registry/families.json``, built by ``build.py`` from the shared configs.

Each family's transformer is built from its real ``config.json`` on the ``meta`` device (``quantization_config``
dropped): only module names and weight shapes are read. Hub ids are the repos the configs come from (the Forge and
SD.Next copies name them: ``_index.tsv``, ``MANIFEST.tsv``; diffusers' pipeline docstrings and conversion scripts) or
the families' well-known diffusers repos. Relations:

- FLUX.1 **dev** is the root of its lineage; **schnell** is its sibling (same shapes without the guidance embedder:
  ``related``); **Krea** (no config of its own is published: FLUX.1 dev's parameters, black-forest-labs/flux
  ``util.py``) and **Kontext** (its derived config, checked equal to dev's shapes) are fine-tunes of it; **Chroma**
  is pruned from it (no per-block modulation, no ``time_text_embed``, a T5 text encoder only: ``absent``, derived
  from the two module sets); **Flex.1-alpha** and **Flux.1-Lite-8B** are students with 8 of its 19 double blocks.
- Flex.1's map is ostris' published Flex LoRA loader (ostris/ComfyUI-FlexTools ``__init__.py``, ``FlexLoraLoader``):
  "the pruning squashed double idx 5-15 into idx 4, making idx 16, 17, 18 become 5, 6, 7"; it drops the LoRA's
  double blocks 4..15 ("it is best to drop idx 4 as well since it is so divergent"), moves 16, 17, 18 to 5, 6, 7
  and ignores the guidance embedder ("we trained the guidance embedder from scratch"). So student blocks 0..3 and
  the single blocks are the teacher's of the same index, 5..7 are 16..18, and teacher block 4 and the guidance
  embedder are ``ignored``. No map is published for Flux.1-Lite-8B.
- SD 3 Medium, SD 3.5 Large and SD 3.5 Medium are separate roots (their shapes differ: widths, MMDiT-X blocks).
- Wan 2.1 I2V 14B (480p and 720p: identical configs, one family) takes Wan 2.1 T2V 14B's LoRAs (``related``; its
  image cross-attention is its own); Wan 2.2 A14B's two experts have Wan 2.1 14B's block shapes (T2V: ``related``
  to Wan 2.1 T2V 14B; I2V: to Wan 2.1 I2V 14B, whose image cross-attention it lacks: ``absent``).
- Qwen-Image-Edit is a fine-tune of Qwen-Image (identical shapes, checked).

Only the components a family's pipeline loads LoRAs into are listed (``_lora_loadable_modules``): FLUX.1's CLIP
text encoder is SD 1.x's (CLIP ViT-L/14, the same config), SD 3's ``text_encoder`` is that CLIP with its projection
and ``text_encoder_2`` SDXL's (CLIP bigG with projection); Wan, Qwen-Image, HunyuanVideo and Chroma adapt the
transformer only (Chroma's ``text_encoder`` is a T5).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

T = "transformer__config.json"
FLUX_TE = {"text_encoder": "flux1-dev"}
SD3_TE = {"text_encoder": "sd3-medium", "text_encoder_2": "sdxl"}
FLUX = dict(pipeline="FluxPipeline", architecture="mmdit")
WAN = dict(pipeline="WanPipeline", architecture="dit")

#: name -> label, pipeline, config folder(s) (checked equal where several), Hub ids, relations.
DIT = {
    "flux1-dev": dict(FLUX, label="FLUX.1 dev", folders=["flux1_dev"], hub_ids=["black-forest-labs/FLUX.1-dev"],
                      components_from={"text_encoder": "sd1"}),
    "flux1-schnell": dict(FLUX, label="FLUX.1 schnell", hub_ids=["black-forest-labs/FLUX.1-schnell"],
                          folders=["flux1_schnell", ("flux1_schnell", "edkamesh_FluX-optimized__transformer__config.json")],
                          related="flux1-dev", components_from=FLUX_TE),
    "flux1-krea-dev": dict(FLUX, label="FLUX.1 Krea dev", folders=["flux1_dev"],
                           hub_ids=["black-forest-labs/FLUX.1-Krea-dev"], role="finetune", teacher="flux1-dev",
                           components_from=FLUX_TE),
    "flux1-kontext-dev": dict(FLUX, label="FLUX.1 Kontext dev", pipeline="FluxKontextPipeline",
                              folders=["flux1_kontext_dev", "flux1_dev"], hub_ids=["black-forest-labs/FLUX.1-Kontext-dev"],
                              role="finetune", teacher="flux1-dev", components_from=FLUX_TE),
    "chroma": dict(FLUX, label="Chroma (FLUX.1 with its modulation pruned)", pipeline="ChromaPipeline",
                   folders=["chroma", ("chroma", "configs__chroma__transformer__config.json")],
                   hub_ids=["lodestones/Chroma1-HD"], role="pruned", related="flux1-dev"),
    "flex1-alpha": dict(FLUX, label="Flex.1-alpha (distilled from FLUX.1 dev)", folders=["flex1_alpha"],
                        hub_ids=["ostris/Flex.1-alpha"], role="student", teacher="flux1-dev", components_from=FLUX_TE,
                        layer_map={f"transformer_blocks.{s}": f"transformer_blocks.{t}" for s, t in ((5, 16), (6, 17), (7, 18))},
                        layer_map_source="published: FlexLoraLoader in ostris/ComfyUI-FlexTools (drops the teacher's "
                                         "double blocks 4..15, moves 16, 17, 18 to 5, 6, 7, ignores the guidance embedder)",
                        ignored=["transformer.transformer_blocks.4.*", "transformer.time_text_embed.guidance_embedder.*"]),
    "flux1-lite-8b": dict(FLUX, label="Flux.1-Lite-8B (distilled from FLUX.1 dev)", folders=["flux1_lite_8b"],
                          hub_ids=["Freepik/flux.1-lite-8B"], role="student", teacher="flux1-dev",
                          components_from=FLUX_TE, layer_map={}, layer_map_source="none published"),
    "sd3-medium": dict(label="Stable Diffusion 3 Medium", pipeline="StableDiffusion3Pipeline", architecture="mmdit",
                       folders=["sd3_medium"], hub_ids=["stabilityai/stable-diffusion-3-medium-diffusers"],
                       components_from={"text_encoder_2": "sdxl"}),
    "sd35-large": dict(label="Stable Diffusion 3.5 Large", pipeline="StableDiffusion3Pipeline", architecture="mmdit",
                       folders=["sd35_large"], components_from=SD3_TE,
                       hub_ids=["stabilityai/stable-diffusion-3.5-large", "stabilityai/stable-diffusion-3.5-large-turbo"]),
    "sd35-medium": dict(label="Stable Diffusion 3.5 Medium", pipeline="StableDiffusion3Pipeline", architecture="mmdit",
                        folders=["sd35_medium"], hub_ids=["stabilityai/stable-diffusion-3.5-medium"],
                        components_from=SD3_TE),
    "wan21-t2v-1.3b": dict(WAN, label="Wan 2.1 T2V 1.3B", folders=["wan21_t2v_1.3b"],
                           hub_ids=["Wan-AI/Wan2.1-T2V-1.3B-Diffusers"]),
    "wan21-t2v-14b": dict(WAN, label="Wan 2.1 T2V 14B", folders=["wan21_t2v_14b"],
                          hub_ids=["Wan-AI/Wan2.1-T2V-14B-Diffusers"]),
    "wan21-i2v-14b": dict(WAN, label="Wan 2.1 I2V 14B", pipeline="WanImageToVideoPipeline",
                          folders=["wan21_i2v_14b_480p", "wan21_i2v_14b_720p"], related="wan21-t2v-14b",
                          hub_ids=["Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers"]),
    "wan22-t2v-a14b": dict(WAN, label="Wan 2.2 T2V A14B", folders=["wan22_t2v_a14b"], experts=True,
                           hub_ids=["Wan-AI/Wan2.2-T2V-A14B-Diffusers"], related="wan21-t2v-14b"),
    "wan22-i2v-a14b": dict(WAN, label="Wan 2.2 I2V A14B", pipeline="WanImageToVideoPipeline", experts=True,
                           folders=["wan22_i2v_a14b"], hub_ids=["Wan-AI/Wan2.2-I2V-A14B-Diffusers"],
                           related="wan21-i2v-14b"),
    "wan22-ti2v-5b": dict(WAN, label="Wan 2.2 TI2V 5B", folders=["wan22_ti2v_5b"],
                          hub_ids=["Wan-AI/Wan2.2-TI2V-5B-Diffusers"]),
    "qwen-image": dict(label="Qwen-Image", pipeline="QwenImagePipeline", architecture="dit", folders=["qwen_image"],
                       hub_ids=["Qwen/Qwen-Image"]),
    "qwen-image-edit": dict(label="Qwen-Image-Edit", pipeline="QwenImageEditPipeline", architecture="dit",
                            folders=["qwen_image_edit", "qwen_image"], hub_ids=["Qwen/Qwen-Image-Edit"],
                            role="finetune", teacher="qwen-image"),
    "hunyuanvideo": dict(label="HunyuanVideo", pipeline="HunyuanVideoPipeline", architecture="mmdit",
                         folders=["hunyuanvideo_t2v"], hub_ids=["hunyuanvideo-community/HunyuanVideo"]),
}

#: A module in a run of blocks: ``<container>.<index>.<rest>`` (the first index of the name).
BLOCK = re.compile(r"^(.+?)\.(\d+)\.(.+)$")


def transformer(config_root: Path, folder: str | tuple[str, str]) -> tuple[str, torch.nn.Module]:
    """The diffusers class name and a meta-device model of a folder's transformer config (or ``(folder, file)``)."""
    import diffusers

    folder, name = folder if isinstance(folder, tuple) else (folder, T)
    config = {k: v for k, v in json.loads((config_root / folder / name).read_text()).items() if k != "quantization_config"}
    with torch.device("meta"):
        return config["_class_name"], getattr(diffusers, config["_class_name"]).from_config(config)


def module_shapes(model: torch.nn.Module, canonical) -> dict[str, list[int]]:
    return {canonical(n): list(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def compact(shapes: dict[str, list[int]]) -> tuple[dict[str, list[int]], dict[str, list]]:
    """``(modules, blocks)``: the modules outside runs of blocks, and each container's blocks as runs of identical
    shape tables ``[[count, {suffix: shape}], …]`` (``families.expand_blocks`` reverses it)."""
    grouped: dict[str, dict[int, dict[str, list[int]]]] = {}
    for module, shape in shapes.items():
        found = BLOCK.match(module)
        if found:
            grouped.setdefault(found[1], {}).setdefault(int(found[2]), {})[found[3]] = shape
    plain, blocks = dict(shapes), {}
    for container, by_index in grouped.items():
        if len(by_index) < 2 or sorted(by_index) != list(range(len(by_index))):
            continue  # not a run of blocks counted from 0
        runs: list[list] = []
        for i in range(len(by_index)):
            if runs and runs[-1][1] == by_index[i]:
                runs[-1][0] += 1
            else:
                runs.append([1, by_index[i]])
        blocks[container] = runs
        for i, table in by_index.items():
            for suffix in table:
                del plain[f"{container}.{i}.{suffix}"]
    return plain, blocks


def absent(own: dict[str, dict], other: dict[str, dict]) -> list[str]:
    """``component.module`` patterns of the modules (with parameters) ``other`` has and ``own`` lacks: block indices
    as ``*``; a whole subtree that ``own`` lacks as ``<subtree>.*``; a component it lacks as ``<component>.*``."""
    out = []
    for component, modules in other.items():
        if component not in own:
            out.append(f"{component}.*")
            continue
        missing = {re.sub(r"(?<=\.)\d+(?=\.)", "*", m, count=1) for m in modules if m not in own[component]}
        present = {re.sub(r"(?<=\.)\d+(?=\.)", "*", m, count=1) for m in own[component]}
        for name in sorted(missing):
            parts = name.split(".")
            # the shortest prefix under which nothing is present (a pruned subtree)
            cut = next(i for i in range(1, len(parts) + 1)
                       if not any(p == ".".join(parts[:i]) or p.startswith(".".join(parts[:i]) + ".") for p in present))
            out.append(f"{component}.{'.'.join(parts[:cut])}" + (".*" if cut < len(parts) else ""))
    return sorted(set(out))


def parameter_modules(model: torch.nn.Module, canonical) -> set[str]:
    """Modules that hold parameters of their own (Linear, Conv, norms with a weight)."""
    return {canonical(n) for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))}


def build_dit(config_root: Path, built: dict, component_shapes) -> dict:
    """The DiT families' entries, given the UNet families already ``built`` (whose text encoders FLUX.1 and SD 3 take)
    and ``component_shapes`` (``build.py``'s reader of a text encoder's config). Raises ``ValueError`` where two
    configs of one family differ in layer shapes, or a derived pattern does not say what it should."""
    from diffusers_lorax.registry.families import expand_blocks
    from diffusers_lorax.weights import canonical_module

    out, held = {}, {}
    for name, spec in DIT.items():
        models = [transformer(config_root, folder) for folder in spec["folders"]]
        if spec.get("experts"):
            models.append(transformer(config_root, (spec["folders"][0], "transformer_2__config.json")))
        cls, model = models[0]
        shapes = module_shapes(model, canonical_module)
        if any(c != cls or module_shapes(m, canonical_module) != shapes for c, m in models[1:]):
            raise ValueError(f"{name}: the configs {spec['folders']} differ in layer shapes")
        modules, blocks = compact(shapes)
        if {**{m: tuple(s) for m, s in modules.items()}, **expand_blocks(blocks)} != {m: tuple(s) for m, s in shapes.items()}:
            raise ValueError(f"{name}: the compact transformer shapes do not expand to the model's")
        components = ["transformer", "transformer_2"] if spec.get("experts") else ["transformer"]
        entry = {"label": spec["label"], "pipeline": spec["pipeline"], "hub_ids": spec["hub_ids"],
                 "role": spec.get("role", "base"), "denoiser": "transformer", "transformer_class": cls,
                 "architecture": spec["architecture"], "shapes": {c: modules for c in components},
                 "blocks": {c: blocks for c in components}}
        if name == "sd3-medium":  # CLIP ViT-L/14 with its projection (model_index.json: CLIPTextModelWithProjection)
            config = json.loads((config_root / "sdxl_base_1.0" / "text_encoder__config.json").read_text())
            entry["shapes"]["text_encoder"] = component_shapes(
                "text_encoder", {**config, "architectures": ["CLIPTextModelWithProjection"]})
        for key in ("teacher", "related", "components_from", "layer_map", "layer_map_source", "ignored"):
            if key in spec:
                entry[key] = spec[key]
        out[name] = entry
        held[name] = {c: parameter_modules(model, canonical_module) for c in components}
    everything = {**built, **out}
    for name, entry in out.items():
        held[name].update({c: _modules(everything, f, c) for c, f in entry.get("components_from", {}).items()})
        held[name].update({c: set(m) for c, m in entry["shapes"].items() if c not in held[name]})
    for name, entry in out.items():
        if entry.get("related"):
            found = absent(held[name], held[entry["related"]])
            _check_patterns(name, found, held[entry["related"]], held[name])
            if found:
                entry["absent"] = found
        if entry.get("ignored"):
            _check_patterns(name, entry["ignored"], held[entry["teacher"]], {})
    return out


def _modules(entries: dict, name: str, component: str) -> set[str]:
    """The module names of a family's ``component``, following ``components_from``."""
    entry = entries[name]
    if component in entry["shapes"]:
        return set(entry["shapes"][component])
    return _modules(entries, entry["components_from"][component], component)


def _check_patterns(name: str, patterns: list[str], where: dict[str, set[str]], nowhere: dict[str, set[str]]) -> None:
    """Every pattern names some module of ``where`` and none of ``nowhere`` (component -> module names)."""
    from fnmatch import fnmatchcase

    for pattern in patterns:
        hits = [f"{c}.{m}" for c, mods in where.items() for m in mods or {""} if fnmatchcase(f"{c}.{m}", pattern)]
        wrong = [f"{c}.{m}" for c, mods in nowhere.items() for m in mods if fnmatchcase(f"{c}.{m}", pattern)]
        if not hits or wrong:
            raise ValueError(f"{name}: the pattern {pattern!r} names {len(hits)} modules it should and {wrong[:3]}")
