"""The transfer-quality testbed: small real-data Stable Diffusion pipelines trained on scikit-learn's handwritten
digits (a source, a fine-tuned target, a distilled target), a style LoRA trained on each, classifiers that score
generated images, and the evaluation that compares transfer methods (see docs/quality.md).

The trained weights ship in ``assets/``; ``benchmarks/quality/build.py`` rebuilds them.
"""

from pathlib import Path

#: Where the trained testbed lives (inside the installed package, so ``lorax demo`` works offline).
ASSETS = Path(__file__).resolve().parent / "assets"
