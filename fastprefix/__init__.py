"""fastprefix: attention with a shared or learned prefix, without materializing the prefix."""

from .ops import prefix_attention
from .prefix import Prefix

__all__ = ["Prefix", "prefix_attention"]
__version__ = "0.1.0"
