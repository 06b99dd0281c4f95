"""What depends only on an adapter's factors, built once while they do not change.

Decoding calls each layer once per token with the same A1, A2, B1, B2; building ``A (q, d_in)`` and
``Bᵀ (q, d_out)`` on every call cost more than the adapter's own products at a few tokens (256², one token,
the 2-core CI machine: 3 of the 3.5 ATen calls beyond the frozen layer's). An entry is keyed by the four
factor tensors themselves (identity), each one's storage, shape and version counter, and what was built
(e.g. ``("A, Bt", dtype)``), so any change rebuilds it: an optimizer step, ``load_state_dict`` and ``copy_``
bump the version counter; a ``.data`` assignment moves the storage. The entry holds the storages it was built
from, so a freed storage's address cannot come back under a stale entry.

The one change a version counter cannot see is an in-place write through ``.data`` (``p.data.mul_(2)``): it
bypasses autograd's own checks the same way. Change factors in place under ``torch.no_grad()`` instead (as
optimizers do), or call ``lsr_compile.clear_factor_cache()`` after such a write.

Entries live as long as the factor tensor ``A1`` (a weak reference): a layer's adapter costs, beside its own
factors, its rank-q A and Bᵀ (a LoRA of rank q's size, half of LoRA r = 8's at q = 4) while it serves.
Tensors created under ``torch.inference_mode`` track no version and are never cached. What is cached must not
hold ``A1`` itself (that would keep the entry alive for ever).
"""
from __future__ import annotations

import weakref
from typing import Callable

from torch import Tensor

# id(A1) -> (weakref to A1, {what: (state, aliases, value)}); the weakref's callback drops the entry with A1
_entries: dict[int, tuple] = {}
MAX_PER_FACTORS = 32


def cached(what, A1: Tensor, A2: Tensor, B1: Tensor, B2: Tensor, build: Callable[[], object]):
    """``build()`` for these factors, or what it returned last time if none of them changed since."""
    try:
        # the storage address changes with the device and dtype too (a new storage); the shape catches a view
        # of the same storage assigned to .data
        state = (A1._version, A2._version, B1._version, B2._version, A1.data_ptr(), A2.data_ptr(),
                 B1.data_ptr(), B2.data_ptr(), A1.shape, A2.shape, B1.shape, B2.shape)
    except RuntimeError:  # inference tensors have no version counter: nothing says when they change
        return build()
    key = id(A1)
    entry = _entries.get(key)
    if entry is not None and entry[0]() is A1:
        hit = entry[1].get(what)
        if hit is not None and hit[0] == state and hit[1][0] is A2 and hit[1][1] is B1 and hit[1][2] is B2:
            return hit[2]
        built = entry[1]
        if len(built) >= MAX_PER_FACTORS:  # keys that carry a call's context (inference runners) come and go
            built.clear()
    else:
        built = {}
        _entries[key] = (weakref.ref(A1, lambda _, k=key, d=_entries: d.pop(k, None)), built)
    value = build()
    # A2, B1, B2 by identity; the detached aliases keep the four storages alive (no address reuse)
    built[what] = (state, (A2, B1, B2, A1.detach(), A2.detach(), B1.detach(), B2.detach()), value)
    return value


generation = 0  # bumped by clear(): what layers remember from a call before it (ops.decode's memos) is stale


def clear() -> None:
    """Forget everything built: the next call of every layer builds again (after writing factors through
    ``.data``, which no version counter sees)."""
    global generation
    _entries.clear()
    generation += 1


def size() -> int:
    """Factor tensors with an entry."""
    return len(_entries)
