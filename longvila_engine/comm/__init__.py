"""Communication layer: ring exchange (async P2P), Ulysses all-to-all, all-to-all-v, traffic counters."""
from .counters import CommStats

__all__ = ["CommStats"]
