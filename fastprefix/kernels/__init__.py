"""Triton kernels of fastprefix (installed as `fastprefix.kernels`): no autograd, no model code.

Modules: `common` (jit helpers and launch utilities), `bank` (a prefix bank read by row index: the entry table
and the jit helpers that address a row's entry), `tuning` (launch configs and the resource gate),
`forward`, `backward` and `decode` (kernels and their launchers), `report` (the ahead-of-time compile report).
Importing this package imports Triton; with TRITON_INTERPRET=1 set before that, the kernels run on CPU
tensors through Triton's interpreter (`INTERPRETED`).
"""

from .backward import attention_backward
from .bank import BankTable
from .common import INTERPRETED
from .decode import decode_forward
from .forward import attention_forward

__all__ = ["INTERPRETED", "BankTable", "attention_backward", "attention_forward", "decode_forward"]
