"""On CUDA, which of SDPA's backends attention uses: flash, memory-efficient, cuDNN or math.

PyTorch picks a backend by rules; which one is fastest depends on the GPU, the dtype, the
head size and whether a mask is given (flash takes none; packed sequences pass one). The
trainer times the ones that accept the model's shapes (`ling.kernels.training`) and pins
the winner for every attention call.
"""

from __future__ import annotations

import functools

from torch.nn.attention import SDPBackend, sdpa_kernel

from ling.model import Attention

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


@functools.cache
def pinned_attention(backend: str) -> type[Attention]:
    """An `Attention` subclass whose SDPA runs on `backend` (falling back to the efficient
    and math kernels for calls the backend refuses, e.g. flash with a mask)."""
    order = [BACKENDS[backend]] + [b for b in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != BACKENDS[backend]]

    class PinnedSDPAAttention(Attention):
        def attend(self, q, k, v, mask, dropout: float):
            with sdpa_kernel(order, set_priority=True):
                return super().attend(q, k, v, mask, dropout)

    PinnedSDPAAttention.__name__ = PinnedSDPAAttention.__qualname__ = f"SDPA{backend.title()}Attention"
    return PinnedSDPAAttention
