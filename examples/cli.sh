#!/usr/bin/env bash
# Transfer a LoRA file between two local diffusers folders and load the result with plain diffusers.
set -euo pipefail
lorax transfer ./sd15 ./realistic-vision ./my_lora.safetensors -o ./my_lora_rv.safetensors --json report.json
python -c "
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained('./realistic-vision')
pipe.load_lora_weights('./my_lora_rv.safetensors')
"
