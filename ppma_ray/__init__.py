"""PPMA (Privacy-Preserving MAE-Align) video pretraining on Ray."""

__version__ = "0.1.0"
