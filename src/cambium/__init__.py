"""cambium: five machine-learning systems (screener, worldmodel, moe, nested, morph) on one small shared core."""

__version__ = "0.1.0"
