"""rnnrep: learning representations of recurrent-network weights (Herrmann et al., ICML 2024)."""

__version__ = "0.1.0"
