"""xpcnn: a convolutional-network trainer written once on the Python Array API."""

__version__ = "0.1.0"
