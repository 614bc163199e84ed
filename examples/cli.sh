#!/usr/bin/env bash
# Transfer a LoRA file between two diffusers base models with the `lorax` command, then load the result with plain
# diffusers (no diffusers_lorax import needed).
#
#   bash examples/cli.sh SOURCE TARGET LORA [OUT_DIR]    # local diffusers folders or Hub repo ids; LoRA: a file
#   bash examples/cli.sh --testbed [OUT_DIR]             # the shipped digits testbed: offline, seconds on a CPU
#
# Writes OUT_DIR/lora_transferred.safetensors (PEFT format), OUT_DIR/report.json and OUT_DIR/report.png (the report
# per layer; needs matplotlib). Extra `lorax transfer` options go in $LORAX_OPTIONS, e.g. "--method prolora".
set -euo pipefail
if [ "${1:-}" = "--testbed" ]; then
    assets=$(python -c "from diffusers_lorax.quality import ASSETS; print(ASSETS)")
    set -- "$assets/source" "$assets/target-finetune" "$assets/loras/slant-source.safetensors" "${2:-.}"
fi
if [ $# -lt 3 ]; then
    echo "usage: $0 SOURCE TARGET LORA [OUT_DIR]  or  $0 --testbed [OUT_DIR]" >&2
    exit 2
fi
source_model=$1 target_model=$2 lora=$3 out=${4:-.}
mkdir -p "$out"

# shellcheck disable=SC2086  # LORAX_OPTIONS is a list of words
lorax transfer "$source_model" "$target_model" "$lora" -o "$out/lora_transferred.safetensors" \
    --json "$out/report.json" --plot "$out/report.png" ${LORAX_OPTIONS:-}

TARGET="$target_model" LORA_FILE="$out/lora_transferred.safetensors" python - <<'EOF'
import os

import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained(os.environ["TARGET"], dtype=torch.float32)
pipe.load_lora_weights(os.environ["LORA_FILE"], adapter_name="transferred")
print("plain diffusers loaded the transferred LoRA:", pipe.get_list_adapters())
EOF
