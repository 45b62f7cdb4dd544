"""aegisd: the AegisLink per-user daemon and its protocol core."""

__version__ = "0.1.0"
