"""Transfer an SD 1.5 LoRA onto an SD 1.5 fine-tune (needs the models on the Hub or in your HF cache)."""

import torch
from diffusers import StableDiffusionPipeline

import diffusers_lorax  # noqa: F401  (adds load_lora_weights_cross)

SOURCE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TARGET = "SG161222/Realistic_Vision_V5.1_noVAE"
LORA = "sayakpaul/sd-model-finetuned-lora-t4"  # a LoRA trained on SD 1.x

pipe = StableDiffusionPipeline.from_pretrained(TARGET, torch_dtype=torch.float16).to("cuda")
report = pipe.load_lora_weights_cross(SOURCE, LORA, adapter_name="style")
print(report.summary())
pipe.set_adapters(["style"], [0.8])
pipe("a pokemon with blue eyes", num_inference_steps=30).images[0].save("styled.png")
