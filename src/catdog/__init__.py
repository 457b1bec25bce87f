"""catdog: train, evaluate, explain, export and serve a CNN image classifier."""

__version__ = "0.1.0"
