"""swap.swapped: a model computing with another same-architecture model's saved weights, read module by module, gives
that model's outputs exactly (float32 and float64, also under accelerate's CPU offload and with a PEFT adapter
injected), puts every forward and tensor back, and refuses files that do not fit, naming the tensor."""

import os

import accelerate
import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from diffusers_lorax import SourceModelError, toy
from diffusers_lorax.swap import FileState, swapped

WEIGHTS = "diffusion_pytorch_model.safetensors"


def unet(seed):
    torch.manual_seed(seed)
    return UNet2DConditionModel(**toy.TINY_SD_UNET).eval()


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """The model whose weights are swapped in, and its saved folder."""
    model = unet(1)
    folder = tmp_path_factory.mktemp("other")
    model.save_pretrained(folder)
    return model, folder


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 16, 16, generator=g).to(dtype), torch.tensor([10, 500]),
            torch.randn(2, 8, 32, generator=g).to(dtype))


def run(model, dtype=torch.float32):
    with torch.no_grad():
        return model(*inputs(dtype)).sample


def held(model):
    """Every parameter and buffer object with a copy of its value (a meta one: the object; its value is in the offload
    hook, checked by running the model), and the instance ``forward`` attributes (accelerate's hooks set one)."""
    tensors = {name: (t, t.detach().clone()) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    return tensors, {name: m.__dict__.get("forward") for name, m in model.named_modules()}


def assert_restored(model, before):
    tensors, forwards = before
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert now.keys() == tensors.keys()
    for name, (obj, value) in tensors.items():
        assert now[name] is obj and (obj.device.type == "meta" or torch.equal(obj, value)), name
    assert {name: m.__dict__.get("forward") for name, m in model.named_modules()} == forwards


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_model_with_the_other_models_weights_swapped_in_computes_the_other_model(other, dtype):
    """The other model run directly is the dense reference: the same values (float32 files, cast exactly to float64)
    in the same operations give the same bits."""
    reference, folder = other
    model = unet(0).to(dtype)
    mine = run(model, dtype)
    custom = model.conv_in.forward  # an instance forward already set stays that very object
    model.conv_in.forward = custom
    before = held(model)
    with swapped(model, FileState([folder / WEIGHTS], "other"), dtype):
        swapped_out = run(model, dtype)
    expected = run(reference.to(dtype), dtype)
    reference.to(torch.float32)
    assert torch.equal(swapped_out, expected) and not torch.equal(mine, expected)
    assert_restored(model, before)
    assert model.conv_in.__dict__["forward"] is custom and "forward" not in model.conv_out.__dict__
    assert torch.equal(run(model, dtype), mine)


@pytest.mark.parametrize("change, message", [
    (lambda state: state.pop("conv_in.weight"), "it has no conv_in.weight"),
    (lambda state: state.update({"conv_out.bias": torch.zeros(5)}), r"its conv_out.bias is \(5,\), not \(4,\)"),
    # a teacher's file against its pruned student: tensors the student has no place for
    (lambda state: state.update({"extra_blocks.0.weight": torch.zeros(2)}), "1 tensors the target has no place for"),
])
def test_files_that_do_not_fit_are_refused_naming_the_tensor(other, tmp_path, change, message):
    _, folder = other
    state = load_file(str(folder / WEIGHTS))
    change(state)
    save_file(state, tmp_path / WEIGHTS)
    model = unet(0)
    before = held(model)
    with pytest.raises(SourceModelError, match=message):
        with swapped(model, FileState([tmp_path / WEIGHTS], "other"), torch.float32):
            pass
    assert_restored(model, before)


def test_swapping_into_a_model_under_accelerates_cpu_offload(other):
    """Sequential offload: every weight is on the meta device between calls, its value in the offload hook."""
    reference, folder = other
    model = unet(0)
    mine = run(model)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.conv_in.weight.device.type == "meta"
    before = held(model)
    with swapped(model, FileState([folder / WEIGHTS], "other"), torch.float32):
        out = run(model)
    assert torch.equal(out, run(reference))
    assert_restored(model, before)
    assert torch.equal(run(model), mine)


def test_swapping_into_a_model_with_an_injected_peft_adapter(other):
    """A PEFT layer's base weights are the file's (``…to_q.weight`` for ``…to_q.base_layer.weight``); its adapter
    stays the model's: the result is the other model with the same adapter."""
    reference, folder = other
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "conv1"], init_lora_weights=False)
    model = unet(0)
    model.add_adapter(config, adapter_name="style")
    with_adapter = unet(1)
    with_adapter.add_adapter(config, adapter_name="style")
    lora = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    assert lora and any(".base_layer." in k for k in model.state_dict())
    assert with_adapter.load_state_dict(lora, strict=False).unexpected_keys == []
    before = held(model)
    with swapped(model, FileState([folder / WEIGHTS], "other"), torch.float32):
        out = run(model)
    expected = run(with_adapter)
    assert torch.equal(out, expected) and not torch.equal(expected, run(reference))
    assert_restored(model, before)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's memory map (Linux /proc)")
def test_no_weight_file_stays_mapped_between_modules(other):
    """Each module reads its tensors and closes the file again: while a later module runs, the source's file is not
    mapped into the process (kept open, every page read would count in its resident memory: the whole model's
    weights by the end of a pass)."""
    _, folder = other
    path = (folder / WEIGHTS).resolve()
    model, mapped = unet(0), []

    def check(module, args, output):
        mapped.append(str(path) in open("/proc/self/maps").read())

    handle = model.conv_out.register_forward_hook(check)
    try:
        with swapped(model, FileState([folder / WEIGHTS], "other"), torch.float32):
            run(model)
    finally:
        handle.remove()
    assert mapped == [False]
