"""fastprefix: attention with a shared or learned prefix, without materializing the prefix."""

from .generation import SeesPrompt
from .ops import prefix_attention
from .patching import PatchHandle, patch, patched, unpatch
from .peft_interop import PeftPrefixModel, from_peft
from .prefix import Prefix
from .trainable import TrainablePrefix
from .validate import PrefixConfigError, PrefixConfigWarning, validate

__all__ = ["PatchHandle", "PeftPrefixModel", "Prefix", "PrefixConfigError", "PrefixConfigWarning", "SeesPrompt",
           "TrainablePrefix", "from_peft", "patch", "patched", "prefix_attention", "unpatch", "validate"]
__version__ = "0.1.0"
