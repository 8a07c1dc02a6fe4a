"""The package version, importable without importing the package (tuning keys read it)."""

__version__ = "0.2.0"
