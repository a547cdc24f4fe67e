"""Prompt embeddings computed once per study.

A search generates the same prompts in the same batches over and over; when the text encoders
are not searched, their outputs never change. :class:`PromptEmbeddings` memoizes the pipeline's
``encode_prompt`` per call (the exact arguments: prompts, device, images per prompt, sequence
length, ...), so each batch is encoded once and the encoders can leave the GPU (T5-XXL alone is
9.5 GB in bf16). A memoized call returns the very tensors the encoders made, so images are
bit-identical with and without it.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable

import torch


class PromptEmbeddings:
    def __init__(self, pipe: Any, encoders: list[str],
                 load: Callable[[], contextlib.AbstractContextManager] | None = None):
        """``load()``: a context in which the ``encoders`` can run (the memory plan streams
        them through the GPU); None: they run where they are."""
        self.pipe, self.encoders = pipe, list(encoders)
        self.original = pipe.encode_prompt  # the bound method
        self.signature = inspect.signature(self.original)
        self.load = load or contextlib.nullcontext
        self.cache: dict[str, Any] = {}
        self.hits = self.misses = 0

    @classmethod
    def install(cls, pipe: Any, encoders: list[str], load=None) -> "PromptEmbeddings | None":
        """Memoize ``pipe.encode_prompt`` (an instance attribute; the class is untouched).
        None when the pipeline has no ``encode_prompt`` or no text encoder to spare."""
        if not encoders or not callable(getattr(pipe, "encode_prompt", None)):
            return None
        current = pipe.__dict__.get("encode_prompt")
        if isinstance(current, cls):
            return current
        memo = cls(pipe, encoders, load)
        pipe.encode_prompt = memo
        return memo

    def uninstall(self) -> None:
        if self.pipe.__dict__.get("encode_prompt") is self:
            del self.pipe.encode_prompt

    def _key(self, args, kwargs) -> str | None:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError:
            return None
        parts = []
        for name, value in bound.arguments.items():
            if isinstance(value, torch.Tensor):
                return None  # precomputed embeddings passed in: nothing to memoize
            if isinstance(value, torch.device):
                value = str(value)
            if not isinstance(value, (str, int, float, bool, type(None), list, tuple, dict)):
                return None
            parts.append(f"{name}={value!r}")
        return "\0".join(parts)

    def __call__(self, *args, **kwargs):
        key = self._key(args, kwargs)
        if key is None:
            with self.load():
                return self.original(*args, **kwargs)
        if key not in self.cache:
            self.misses += 1
            with self.load():
                self.cache[key] = self.original(*args, **kwargs)
        else:
            self.hits += 1
        return _clone(self.cache[key])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for out in self.cache.values()
                   for t in _tensors(out))


def _tensors(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (list, tuple)):
        for o in out:
            yield from _tensors(o)


def _clone(out):
    """A fresh copy for the caller (a pipeline that edits its embeddings in place must not edit
    the cache)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (list, tuple)):
        return type(out)(_clone(o) for o in out)
    return out
