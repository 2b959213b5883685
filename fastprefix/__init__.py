"""fastprefix: attention with a shared or learned prefix, without materializing the prefix.

The public names are imported from their modules on first use, so that `import fastprefix` imports no torch
until one is used: the `fastprefix` command answers `--help` and argument errors at once.
"""

import importlib
import sys
import types

_PUBLIC = {  # module -> the public names it defines
    "bank": ("BankRows", "PrefixBank"),
    "generation": ("SeesPrompt",),
    "ops": ("prefix_attention",),
    "patching": ("PatchHandle", "patch", "patched", "unpatch"),
    "peft_interop": ("PeftPrefixModel", "from_peft"),
    "prefix": ("Prefix",),
    "trainable": ("TrainablePrefix",),
    "validate": ("PrefixConfigError", "PrefixConfigWarning", "validate"),
}
_MODULE_OF = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = sorted(_MODULE_OF)
__version__ = "0.1.0"


class _Package(types.ModuleType):
    """The package: a public name is looked up in its module when first used. The import system binds every
    submodule it imports to the package; where a public name is also a submodule's (`validate`), the public
    object keeps the name, as when the package imported it eagerly."""

    def __getattr__(self, name):
        if name not in _MODULE_OF:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
        types.ModuleType.__setattr__(self, name, value)
        return value

    def __setattr__(self, name, value):
        if name in _MODULE_OF and isinstance(value, types.ModuleType):
            return
        types.ModuleType.__setattr__(self, name, value)

    def __dir__(self):
        return sorted(set(types.ModuleType.__dir__(self)) | set(_MODULE_OF))


sys.modules[__name__].__class__ = _Package
