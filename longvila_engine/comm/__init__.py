"""Communication layer: ring exchange (async P2P), Ulysses all-to-all, all-to-all-v, traffic counters."""
from .all_to_all import all_to_all_v, head_to_seq_all_to_all, seq_to_head_all_to_all
from .counters import CommStats
from .ring import RingExchange

__all__ = ["CommStats", "RingExchange", "all_to_all_v", "seq_to_head_all_to_all", "head_to_seq_all_to_all"]
