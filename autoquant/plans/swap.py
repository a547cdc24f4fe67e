"""Putting one module in place of another inside a model: the one helper that apply, revert,
persist and the search's layer cache share."""

from __future__ import annotations

from torch import nn


def parent_of(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """``(parent module, attribute name)`` of the submodule at ``path`` (``a.b.c`` -> (a.b, c))."""
    parent_path, _, child = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), child


def swap_module(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``path`` inside ``root``; return the module that was there."""
    parent, child = parent_of(root, path)
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old
