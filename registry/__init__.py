"""Shipped catalogue of known base-model families (data: families.json; generator: build.py)."""
