"""Triton kernels of fastprefix (installed as `fastprefix.kernels`): no autograd, no model code.

Importing this module imports Triton; with TRITON_INTERPRET=1 set before that, the kernels run on CPU
tensors through Triton's interpreter (`INTERPRETED`).
"""

from .decode_attention import DECODE_MAX_HEAD_DIM, DECODE_MAX_N, decode_forward
from .prefix_attention import INTERPRETED, MAX_HEAD_DIM, attention_backward, attention_forward

__all__ = ["DECODE_MAX_HEAD_DIM", "DECODE_MAX_N", "INTERPRETED", "MAX_HEAD_DIM", "attention_backward",
           "attention_forward", "decode_forward"]
