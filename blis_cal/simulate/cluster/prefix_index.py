"""The router-side prefix index: which KV block hashes each instance has been sent, LRU-bounded.

The router cannot see an instance's KV cache; like llm-d's prefix scorer it remembers the block hashes of
the prompts it routed to each instance and assumes they are still cached there (evicting its own memory
LRU at a fixed capacity per instance, as the instance's cache would).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from blis_cal.errors import ConfigError


def block_keys(segments: Sequence[tuple[str, int]], block_size: int) -> list[int]:
    """One key per full block of a prompt given as content segments; equal keys = equal prompt up to the
    end of that block (the identity `kv_cache.block_hashes` gives, at a quarter of the cost: one tuple hash
    per block). Keys are only compared with each other inside one run, so Python's per-process string
    hashing cannot change any outcome."""
    out: list[int] = []
    chain = 0  # identity of the complete segments before the current one
    start = 0
    block_end = block_size
    for key, length in segments:
        if length == 0:
            continue  # an empty segment holds no tokens (kv_cache skips it too)
        end = start + length
        while block_end <= end:
            out.append(hash((chain, key, block_end - start)))
            block_end += block_size
        chain = hash((chain, key, length))
        start = end
    return out


class PrefixIndex:
    """Per-instance LRU sets of block hashes; `match_length` counts the leading blocks an instance has seen."""

    def __init__(self, num_instances: int, capacity_blocks: int) -> None:
        if num_instances < 1:
            raise ConfigError(f"prefix index: instances must be >= 1, got {num_instances}")
        if capacity_blocks < 1:
            raise ConfigError(f"prefix index: prefix_cache_blocks must be >= 1, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._seen: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_instances)]

    def match_length(self, hashes: Sequence[int], instance: int) -> int:
        """Number of consecutive blocks from the start of `hashes` the instance holds (a chain: vLLM's
        prefix cache only hits on an unbroken run of full blocks from token 0)."""
        seen = self._seen[instance]
        matched = 0
        for h in hashes:
            if h not in seen:
                break
            matched += 1
        return matched

    def record(self, hashes: Sequence[int], instance: int) -> None:
        """Remember that `instance` now holds these blocks (most recently used last), evicting the oldest."""
        seen = self._seen[instance]
        for h in hashes:
            if h in seen:
                seen.move_to_end(h)
            else:
                seen[h] = None
        while len(seen) > self.capacity_blocks:
            seen.popitem(last=False)

    def size(self, instance: int) -> int:
        return len(self._seen[instance])
