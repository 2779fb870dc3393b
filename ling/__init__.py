"""ling (零, "zero"): from zero to a served language model, in PyTorch 2."""

__version__ = "0.1.0"
