"""The registry's shipped entries: known base-model families (data: families.json; generator: build.py), installed as
``diffusers_lorax.registry.shipped``."""
