"""cirtorch's multi-scale extraction (``extract_ms``), restated in PyTorch.

Written from the facts of filipradenovic/cnnimageretrieval-pytorch
(``cirtorch/networks/imageretrievalnet.py``): for each scale ``s`` of ``ms`` the normalised NCHW
input is resized with ``nn.functional.interpolate(input, scale_factor=s, mode='bilinear',
align_corners=False)`` (``s == 1``: the input itself), passed through the network, whose output
is the L2-normalised pooled vector, and raised to ``msp``; the sum is divided by ``len(ms)``,
raised to ``1 / msp`` and divided by its norm. ``cirtorch/examples/test.py`` sets ``msp`` to the
GeM exponent ``p`` when the network pools with (non-regional, unwhitened) GeM and to 1 otherwise.

``net`` is any callable ``NCHW float tensor [1, 3, H, W] -> [1, D]`` (the caller's network: here
the tests wrap the Flax encoder and pooling, since ``extract_ms`` treats the network as opaque).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

#: ``--multiscale '[1, 1/2**(1/2), 1/2]'`` of cirtorch's test script.
MS = (1.0, 1.0 / math.sqrt(2.0), 0.5)


def l2n(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """cirtorch's ``L2N``: ``x / (||x||_2 + eps)`` over the last dimension."""
    return x / (torch.linalg.norm(x, dim=-1, keepdim=True) + eps)


def extract_ms(
    net: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    ms: Sequence[float] = MS,
    msp: float = 1.0,
) -> torch.Tensor:
    """The multi-scale descriptor ``[D]`` of one normalised image ``[1, 3, H, W]``."""
    v = None
    for s in ms:
        if s == 1:
            image_t = image.clone()
        else:
            image_t = F.interpolate(image, scale_factor=s, mode="bilinear", align_corners=False)
        term = net(image_t).pow(msp).squeeze(0)
        v = term if v is None else v + term
    v = v / len(ms)
    v = v.pow(1.0 / msp)
    return v / v.norm()
