"""The installed lenscan's version (its own module, so that nothing imports the package for it)."""

__version__ = "0.1.0"
