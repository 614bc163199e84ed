"""The package version: the one place it is written (pyproject.toml reads it from here). It is part of every
transferred-adapter cache key, so a release that changes the math never serves an adapter cached by another."""

__version__ = "0.1.0"
