"""model-sidecar: a traffic manager for ML model servers."""

__version__ = "0.1.0"
