"""Putting a kernel into a built model: swap a module's class or replace a module, in place.

A kernel that computes one method of a model module differently is a subclass of it
(`ExplicitAttention(Attention)` overrides `attend`); swapping the instance's class keeps
its parameters, buffers and state-dict names untouched, so checkpoints, optimizers and
LoRA see the same model. A kernel with other state (a prepacked weight) replaces the module.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn


def swap_class(model: nn.Module, base: type, kernel: type, where: Callable[[nn.Module], bool] = lambda m: True) -> int:
    """Make every module of exactly type `base` (that `where` accepts) an instance of the
    subclass `kernel`; returns how many were swapped."""
    assert issubclass(kernel, base), f"{kernel.__name__} must subclass {base.__name__}"
    count = 0
    for module in model.modules():
        if type(module) is base and where(module):
            module.__class__ = kernel
            count += 1
    return count


def replace_modules(model: nn.Module, match: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace each child module that `match` accepts by `make(child)`; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if match(child):
                setattr(parent, name, make(child))
                count += 1
    return count
