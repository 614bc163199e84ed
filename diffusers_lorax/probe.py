"""Measure an adapter's effect on a base model with forward passes only: no data, no training.

The effect is ‖ε(x_t, t, c; with the adapter) − ε(x_t, t, c; without)‖ of the denoiser (a ``UNet2DConditionModel``:
SD 1.x/2.x and SDXL), on random latents ``x_t ~ N(0, I)`` at the model's native latent size and at timesteps spread
evenly over the training schedule, with prompts ``c`` embedded by the model's own text encoder(s), with the adapter's
text-encoder layers applied in the "with" passes. For a variance-preserving schedule (the DDPM/SD one), ``x_t =
√ᾱ_t x_0 + √(1−ᾱ_t) ε`` with ``x_0, ε ~ N(0, I)`` is exactly ``N(0, I)`` at every t, so random latents stand for
noised latents of unit variance at every timestep. The same latents, timesteps and prompts are used on both models.

The adapter is applied with forward hooks that add ``B (A x)`` to the output of each adapted ``Linear`` / ``Conv2d``
(``A`` a convolution with the base layer's kernel, stride, padding and dilation, ``B`` a 1×1 convolution): the
computation of PEFT's LoRA layer (``lora_B(lora_A(x)) · scaling``, scaling folded into ``B``), without injecting
anything into the model; the hooks are removed, and any PEFT adapters the model already carries are re-enabled as
they were, when a pass ends. Each hook also records ``‖B A x‖²`` and ``‖W x‖²`` (its layer's local effect).

A model given as a pipeline object is run as it is (its device and dtype). One given as a folder or Hub id is loaded
in two steps, each freed before the next: its tokenizers and text encoders (``pipeline_class.from_pretrained`` with
every other component ``None``: nothing else is read or downloaded), then its UNet (``from_pretrained(...,
subfolder="unet", low_cpu_mem_usage=True)``). So at most one extra UNet is in memory at a time.
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .architectures import unet as unet_architecture
from .errors import InvalidOptionsError, SourceModelError
from .held import unwrap_compiled
from .models import BaseModel
from .weights import canonical_module

#: ``(component, canonical module) -> (A (r, in[, kh, kw]), B (out, r[, 1, 1]))``, the scale folded into ``B``.
Factors = dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
_KEEP = {"tokenizer", "tokenizer_2", *TEXT_COMPONENTS, "scheduler"}


@dataclass(frozen=True)
class Samples:
    """The probe inputs shared by both models: ``count`` latents ``N(0, I)`` from ``seed``, timesteps evenly spread
    over the schedule (midpoints of ``count`` equal bins of ``[0, T)``), sample ``j`` with ``prompts[j % P]``."""

    prompts: tuple[str, ...]
    count: int
    seed: int = 0
    batch: int = 4


@dataclass
class Effect:
    """What the passes measured on one model: ``total`` = Σ over samples of ‖Δε‖² (Δε = ε with − ε without the
    adapter, float64 sums), ``groups`` the same with only one group's layers applied (groups asked for), ``local``
    per hooked layer (Σ‖B A x‖², Σ‖W x‖²) in the pass with every layer applied, ``base`` = Σ‖ε without‖²,
    ``per_sample`` the ‖Δε‖² of each sample (their sum is ``total``)."""

    total: float = 0.0
    per_sample: list[float] = field(default_factory=list)
    base: float = 0.0
    groups: dict[str, float] = field(default_factory=dict)
    local: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    passes: int = 0


class Denoiser:
    """One model's text encoders and UNet, borrowed from a pipeline or loaded from its files (see the module
    docstring); use as a context manager so that what was loaded is freed."""

    def __init__(self, model: BaseModel, device: torch.device, dtype: torch.dtype):
        self.model, self.device, self.dtype = model, device, dtype
        self.pipe = model.model if model.kind == "pipeline" else None
        self.unet = getattr(self.pipe, "unet", None) if self.pipe is not None else None

    def __enter__(self) -> Denoiser:
        return self

    def __exit__(self, *exc) -> None:
        if self.model.kind != "pipeline":
            self.pipe = self.unet = None
            gc.collect()

    def _from_pretrained(self, cls: type, **kwargs):
        options = self.model.options
        if self.model.kind == "hub" and options.subfolder:
            raise InvalidOptionsError(
                f"calibration loads the {self.model.role} {self.model.label!r} with diffusers' from_pretrained, which "
                "cannot read a pipeline from a subfolder of a Hub repo: pass calibrate=False, or a local folder")
        root = str(self.model.path) if self.model.kind == "folder" else self.model.hub_id
        hub = {k: v for k, v in dict(revision=options.revision, variant=options.variant, token=options.token,
                                     cache_dir=options.cache_dir).items() if v is not None}
        try:
            return cls.from_pretrained(root, dtype=self.dtype, **hub, **kwargs)
        except Exception as err:  # missing files, offline cache misses, bad configs
            raise SourceModelError(
                f"calibration could not load {kwargs.get('subfolder', 'the text encoders')} of the {self.model.role} "
                f"{self.model.label!r}: {type(err).__name__}: {err}") from err

    def load_text(self) -> None:
        if self.pipe is None:
            index = self.model._required_model_index()
            skip = {name: None for name in index if not name.startswith("_") and name not in _KEEP}
            self.pipe = self._from_pretrained(self.model.pipeline_class, **skip).to(self.device)

    def load_unet(self) -> None:
        if self.unet is None:
            self.pipe = None  # the text encoders go before the UNet comes
            gc.collect()
            library, name = self.model._required_model_index().get("unet", (None, None))
            if name is None:
                raise InvalidOptionsError(
                    f"calibration needs a UNet; the {self.model.role} {self.model.label!r} has none")
            cls = getattr(importlib.import_module(library), name)
            self.unet = self._from_pretrained(cls, subfolder="unet", low_cpu_mem_usage=True).to(self.device).eval()

    def encode(self, prompts: tuple[str, ...], factors: Factors, local: dict | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings ``(P, L, D)`` and, for SDXL, pooled embeddings ``(P, D2)`` (else ``None``), with the
        text-encoder layers of ``factors`` applied (their local effects added to ``local``)."""
        self.load_text()
        encoders = {c: getattr(self.pipe, c) for c in TEXT_COMPONENTS if getattr(self.pipe, c, None) is not None}
        with torch.no_grad(), hooked(encoders, factors, local if local is not None else {}):
            out = self.pipe.encode_prompt(list(prompts), device=self.device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
        return out[0], (out[2] if len(out) == 4 else None)

    def timesteps(self, count: int) -> torch.Tensor:
        scheduler = getattr(self.pipe, "scheduler", None)
        total = int(getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000) or 1000)
        return ((torch.arange(count, dtype=torch.float64) + 0.5) * total / count).long()

    def eps(self, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor | None):
        return unet_architecture.denoise(self.unet, latents, t, embeds, pooled, self.model.role)


def measure(model: BaseModel, factors: Factors, samples: Samples, device: torch.device, dtype: torch.dtype,
            groups: dict[str, set[tuple[str, str]]] | None = None) -> Effect:
    """Run the passes on ``model`` (see the module docstring) with the adapter ``factors`` and return its
    :class:`Effect`. ``groups`` (name → layer keys) asks for one extra pass per group, with only its layers applied.
    Passes: ``2 · count`` (plus ``count`` per group), in batches of ``samples.batch``. Raises
    :class:`SourceModelError` if the model cannot be loaded, :class:`InvalidOptionsError` if it is not a UNet model."""
    effect = Effect()
    groups = groups or {}
    with Denoiser(model, device, dtype) as net:
        text_keys = {key for key in factors if key[0] in TEXT_COMPONENTS}
        plain = net.encode(samples.prompts, {})
        styled = net.encode(samples.prompts, factors, effect.local) if text_keys else plain
        per_group = {g: net.encode(samples.prompts, {k: factors[k] for k in keys & text_keys}) if keys & text_keys
                     else plain for g, keys in groups.items()}
        timesteps = net.timesteps(samples.count)
        net.load_unet()
        config = net.unet.config
        size = config.sample_size if isinstance(config.sample_size, int) else tuple(config.sample_size)[0]
        generator = torch.Generator().manual_seed(samples.seed)
        latents = torch.randn((samples.count, config.in_channels, size, size), generator=generator)
        unet_factors = {key: value for key, value in factors.items() if key[0] == "unet"}
        for start in range(0, samples.count, samples.batch):
            rows = list(range(start, min(start + samples.batch, samples.count)))
            batch = _Batch(net, effect, latents[rows].to(device, dtype), timesteps[rows],
                           [j % len(samples.prompts) for j in rows])
            eps0 = batch.run(plain, {})
            effect.base += float(eps0.pow(2).sum())
            delta = (batch.run(styled, unet_factors, effect.local) - eps0).pow(2).flatten(1).sum(1)
            effect.per_sample += delta.tolist()
            effect.total += float(delta.sum())
            for g, keys in groups.items():
                layers = {k: unet_factors[k] for k in keys if k in unet_factors}
                change = float((batch.run(per_group[g], layers) - eps0).pow(2).sum())
                effect.groups[g] = effect.groups.get(g, 0.0) + change
    return effect


@dataclass
class _Batch:
    """One batch of probe samples: latents ``(b, C, H, W)``, timesteps ``(b,)``, the prompt index of each."""

    net: Denoiser
    effect: Effect
    x: torch.Tensor
    t: torch.Tensor
    pick: list[int]

    def run(self, embedded: tuple[torch.Tensor, torch.Tensor | None], layers: Factors, local: dict | None = None):
        """ε ``(b, C, H, W)`` float64 with ``layers`` hooked on the UNet and these prompt embeddings."""
        self.effect.passes += len(self.pick)
        emb, pooled = embedded
        with torch.no_grad(), hooked({"unet": self.net.unet}, layers, local if local is not None else {}):
            pooled = pooled[self.pick] if pooled is not None else None
            return self.net.eps(self.x, self.t, emb[self.pick], pooled).double()


@contextmanager
def hooked(components: dict[str, torch.nn.Module], factors: Factors,
           local: dict[tuple[str, str], list[float]]) -> Iterator[None]:
    """Apply ``factors`` to the ``Linear``/``Conv2d`` modules of ``components`` by forward hooks (module docstring),
    with every PEFT adapter already on them disabled; accumulate ``[Σ‖B A x‖², Σ‖W x‖²]`` per layer into ``local``.
    Raises :class:`SourceModelError` if a layer names no such module."""
    handles, peft_layers = [], []
    try:
        for component, root in components.items():
            names = {}
            for name, module in unwrap_compiled(root).named_modules():
                if hasattr(module, "base_layer") and hasattr(module, "_disable_adapters"):
                    if not getattr(module, "merged", False):  # a fused adapter is part of the weights: left alone
                        peft_layers.append((module, module._disable_adapters))
                        module._disable_adapters = True
                elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    names[canonical_module(name.removesuffix(".base_layer"))] = module
            for (comp, module_name), (A, B) in factors.items():
                if comp != component:
                    continue
                module = names.get(canonical_module(module_name))
                if module is None:
                    raise SourceModelError(f"calibration: {component} has no Linear/Conv2d module {module_name!r}")
                branch = _Branch(module, A, B, local.setdefault((comp, module_name), [0.0, 0.0]))
                handles.append(module.register_forward_hook(branch))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, was_disabled in peft_layers:
            module._disable_adapters = was_disabled


class _Branch:
    """Forward hook adding ``B (A x)`` to a Linear (A ``(r, in)``, B ``(out, r)``) or Conv2d (A ``(r, in, kh, kw)``
    with the layer's stride, padding and dilation; B ``(out, r, 1, 1)``) output, recording the two squared norms."""

    def __init__(self, module: torch.nn.Module, A: torch.Tensor, B: torch.Tensor, record: list[float]):
        self.A = A
        self.B = B.reshape(B.shape[0], B.shape[1], *([1, 1] if isinstance(module, torch.nn.Conv2d) else []))
        self.record = record

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if (self.A.device, self.A.dtype) != (x.device, x.dtype):  # the input's, not the weight's: that may be
            # quantized (int8 codes) or on the meta device between offload hooks
            self.A, self.B = self.A.to(x.device, x.dtype), self.B.to(x.device, x.dtype)
        if isinstance(module, torch.nn.Conv2d):
            delta = F.conv2d(F.conv2d(x, self.A, None, module.stride, module.padding, module.dilation), self.B)
        else:
            delta = F.linear(F.linear(x, self.A), self.B)
        self.record[0] += float(delta.double().pow(2).sum())
        self.record[1] += float(output.double().pow(2).sum())
        return output + delta
