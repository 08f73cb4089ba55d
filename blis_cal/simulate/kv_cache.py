"""Block KV cache with prefix caching, modelled on vLLM V1's KVCacheManager + BlockPool.

vLLM behaviour reproduced (v1/core/kv_cache_manager.py, block_pool.py, single_type_kv_cache_manager.py):
- block 0 is the pool's null block, so `num_gpu_blocks - 1` blocks hold KV;
- a full block is identified by the hash chain of its content; only full blocks are cached and a lookup
  hits at most `num_tokens - 1` tokens (the last prompt token is recomputed for its logits);
- free blocks sit in one queue: new blocks are popped from the head (evicting their hash); a finished or
  preempted request's blocks are freed last-to-first, hashed ones appended to the tail (LRU), unhashed
  ones pushed to the head (reused first);
- a hit on a free block removes it from the queue; the admission check counts such blocks as needed.

Hashes are tuples of ints hashed by Python (the same in every process). When every request is known in
advance (`Simulation.mark_private_content`), blocks whose content no other request has skip the hash
chain: they carry a (request_id, index) marker, which keeps vLLM's queue order and lets a preempted
request find them again, and nothing else could ever hit them.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Collection, Sequence

from blis_cal.simulate.request import ReqState, output_key

_ROOT_HASH = 0x5BD1E995  # parent of block 0; any constant works


@functools.lru_cache(maxsize=1 << 16)  # bounded: a long-lived twin server sees endless request keys
def _key_hash(key: str) -> int:
    """Stable 64-bit hash of a content key (Python's str hash is salted per process; this is not)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def _chain_hashes(
    segments: Sequence[tuple[str, int]],
    tail_key: str | None,
    first_block: int,
    last_block: int,
    block_size: int,
    parent: int,
) -> list[int]:
    """Hashes of blocks [first_block, last_block) of the token sequence `segments` (+ unbounded `tail_key`).

    Each block hashes (parent hash, (key, start, end) of every segment piece inside it); tuples of ints hash
    identically in every process, so results do not depend on PYTHONHASHSEED.
    """
    out: list[int] = []
    if first_block >= last_block:
        return out
    segs = list(segments)
    if tail_key is not None:
        segs.append((tail_key, 1 << 62))  # the request's own output: unbounded
    hashes = [_key_hash(key) for key, _ in segs]
    nseg = len(segs)
    index = 0
    seg_start = 0
    block = first_block
    while block < last_block:
        start = block * block_size
        end = start + block_size
        while index < nseg and seg_start + segs[index][1] <= start:
            seg_start += segs[index][1]
            index += 1
        if index == nseg:
            raise ValueError(f"block {block} extends past the known tokens")
        seg_end = seg_start + segs[index][1]
        if end <= seg_end:  # the common case: blocks inside one segment, hashed in a tight loop
            key_hash = hashes[index]
            stop = min(last_block, block + (seg_end - start) // block_size)
            for offset in range(
                start - seg_start, start - seg_start + (stop - block) * block_size, block_size
            ):
                parent = hash((parent, key_hash, offset, offset + block_size))
                out.append(parent)
            block = stop
            continue
        pieces = [parent]  # a block spanning segments: hash every piece
        pos, i, base = start, index, seg_start
        while pos < end:
            if i == nseg:
                raise ValueError(f"block {block} extends past the known tokens")
            length = segs[i][1]
            piece_end = min(end, base + length)
            if piece_end > pos:
                pieces += (hashes[i], pos - base, piece_end - base)
            pos = piece_end
            base += length
            i += 1
        parent = hash(tuple(pieces))
        out.append(parent)
        block += 1
    return out


def block_hashes(segments: Sequence[tuple[str, int]], block_size: int) -> list[int]:
    """Hashes of the full blocks of a prompt given as content segments (public: prefix-aware routers)."""
    total = sum(length for _, length in segments)
    return _chain_hashes(segments, None, 0, total // block_size, block_size, _ROOT_HASH)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """One instance's KV block pool. Block ids 1..num_gpu_blocks-1 (0 is vLLM's null block)."""

    def __init__(
        self, num_gpu_blocks: int, block_size: int, enable_caching: bool, max_model_len: int
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_gpu_blocks - 1  # usable blocks (vLLM reserves one null block)
        self.enable_caching = enable_caching
        self.max_model_len = max_model_len
        # vLLM's single free queue, in two parts: its front is `free_stack` (unhashed blocks, pushed on the
        # front when freed; top = front), then `free_lru` (never-used blocks, then hashed blocks appended in
        # LRU order). Only hashed blocks are ever taken out of the middle (prefix hits), and they live in
        # free_lru, so this is the same order with O(1) bulk pushes on the front. free_lru is a list read
        # from `lru_head` (bulk pops are slices) with lazy deletion: a hit taking a block out of the queue
        # leaves its entry behind and counts it in `stale[block]`; a block's stale entries always precede
        # its live one (FIFO), so a popped entry is skipped while its block's stale count is positive.
        self._n = num_gpu_blocks
        self.free_stack: list[int] = []
        self.free_lru: list[int] = list(range(1, num_gpu_blocks))
        self.lru_head = 0
        self.stale = [0] * num_gpu_blocks
        self.num_stale = 0  # Σ stale: while 0, every entry from lru_head on is live
        self.num_lru = num_gpu_blocks - 1
        self.ref_cnt = [0] * num_gpu_blocks
        self.block_hash: list[int | None] = [None] * num_gpu_blocks
        self.cached: dict[int, int] = {}  # hash -> the block lookups return (the first one cached)
        self.duplicates: dict[int, list[int]] = {}  # hash -> later blocks with the same content
        self.req_blocks: dict[int, list[int]] = {}
        # Blocks whose content only their request can have carry (request_id, index) instead of a hash; a
        # preempted request finds them again through this index (made at preemption), checked by the marker.
        self.private: dict[int, dict[int, int]] = {}
        self.num_cached_blocks: dict[int, int] = {}

    # ------------------------------------------------------------------------------------------ state
    @property
    def num_free(self) -> int:
        return len(self.free_stack) + self.num_lru

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_stack) - self.num_lru

    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def blocks_of(self, request_id: int) -> list[int]:
        return self.req_blocks.get(request_id, [])

    # ------------------------------------------------------------------------------------------ hashing
    def ensure_hashes(self, state: ReqState, num_tokens: int) -> list[int]:
        """Extend the request's block-hash chain to cover the full blocks of its first `num_tokens` tokens."""
        hashes = state.block_hashes
        want = num_tokens // self.block_size
        if want > len(hashes):
            parent = hashes[-1] if hashes else _ROOT_HASH
            hashes += _chain_hashes(
                state.req.segments, output_key(state.request_id), len(hashes), want, self.block_size, parent
            )
        return hashes

    # ------------------------------------------------------------------------------------------ vLLM API
    def get_computed_blocks(self, state: ReqState) -> list[int]:
        """Longest run of cached full blocks from the start, hitting at most num_tokens − 1 tokens."""
        if not self.enable_caching:
            return []
        # vLLM: "When all tokens hit the cache, we must recompute the last token to obtain logits."
        max_blocks = (state.num_tokens - 1) // self.block_size
        if max_blocks <= 0:
            return []
        shared = min(max_blocks, state.private_from // self.block_size)
        hashes = self.ensure_hashes(state, shared * self.block_size)
        hit: list[int] = []
        cached = self.cached
        for i in range(shared):
            block = cached.get(hashes[i])
            if block is None:
                return hit
            hit.append(block)
        own = self.private.get(state.request_id)
        if own:
            rid = state.request_id
            block_hash = self.block_hash
            for i in range(shared, max_blocks):
                block = own.get(i)
                if block is None or block_hash[block] != (rid, i):
                    break
                hit.append(block)
        return hit

    def allocate_slots(
        self,
        state: ReqState,
        num_new_tokens: int,
        new_computed_blocks: Sequence[int] = (),
        full_sequence_must_fit: bool = False,
    ) -> bool:
        """vLLM allocate_slots: room for `num_new_tokens` more tokens (after any prefix hit); False if full."""
        bs = self.block_size
        rid = state.request_id
        blocks = self.req_blocks.get(rid)
        if blocks is None:
            blocks = []
        ref = self.ref_cnt
        n_have = len(blocks) + len(new_computed_blocks)
        evictable = sum(1 for b in new_computed_blocks if ref[b] == 0)
        local_computed = state.num_computed + len(new_computed_blocks) * bs
        free = len(self.free_stack) + self.num_lru
        if full_sequence_must_fit:
            # vLLM scheduler_reserve_full_isl (default on): admit only if the whole sequence fits now.
            full = cdiv(min(state.num_tokens, self.max_model_len), bs)
            if max(full - n_have, 0) + evictable > free:
                return False
        need_slot = min(local_computed + num_new_tokens, self.max_model_len)
        num_new_blocks = max(cdiv(need_slot, bs) - n_have, 0)
        if num_new_blocks + evictable > free:
            return False
        for b in new_computed_blocks:
            if ref[b] == 0:  # a hit on a cached free block takes it out of the queue
                self.stale[b] += 1
                self.num_stale += 1
                self.num_lru -= 1
            ref[b] += 1
            blocks.append(b)
        if num_new_blocks:
            blocks += self._take_free(num_new_blocks)
        self.req_blocks[rid] = blocks
        if self.enable_caching:
            self.cache_blocks(state, min(local_computed + num_new_tokens, state.num_tokens))
        return True

    def append_blocks(self, block_lists: Collection[list[int]]) -> None:
        """One more block for each decoding request crossing a block boundary, given as its `req_blocks`
        list (fast path of allocate_slots; the caller has checked there are enough free blocks)."""
        for blocks, b in zip(block_lists, self._take_free(len(block_lists)), strict=True):
            blocks.append(b)

    def _take_free(self, count: int) -> list[int]:
        """Pop `count` blocks from the front of the free queue, evicting their cached content."""
        stack = self.free_stack
        block_hash = self.block_hash
        ref = self.ref_cnt
        out: list[int] = []
        if stack:  # the front part first: unhashed blocks, top of the stack = front of the queue
            take = min(count, len(stack))
            out = stack[-take:]
            out.reverse()
            del stack[-take:]
            for b in out:
                ref[b] = 1
            count -= take
            if not count:
                return out
        lru = self.free_lru
        head = self.lru_head
        if not self.num_stale:  # every entry is live: one slice
            taken = lru[head : head + count]
            head += count
        else:
            stale = self.stale
            taken = []
            append = taken.append
            while len(taken) < count:
                b = lru[head]
                head += 1
                if stale[b]:  # an entry left behind by a prefix hit
                    stale[b] -= 1
                    self.num_stale -= 1
                else:
                    append(b)
        if head > 4096 and head * 2 > len(lru):  # drop the consumed front (amortised O(1))
            del lru[:head]
            head = 0
        self.lru_head = head
        self.num_lru -= count
        cached = self.cached
        duplicates = self.duplicates
        for b in taken:
            h = block_hash[b]
            if h.__class__ is tuple:  # private content: nothing indexes it
                block_hash[b] = None
            elif h is not None:
                if h in duplicates or cached[h] != b:
                    self._evict(b, h)
                else:  # the common case, inlined: the only block holding this content
                    del cached[h]
                    block_hash[b] = None
            ref[b] = 1
        if out:
            out += taken
            return out
        return taken

    def cache_blocks(self, state: ReqState, num_tokens: int) -> None:
        """Register the hashes of the request's blocks that are now full (vLLM cache_full_blocks)."""
        num_full = num_tokens // self.block_size
        rid = state.request_id
        start = self.num_cached_blocks.get(rid, 0)
        if num_full <= start:
            return
        first_private = state.private_from // self.block_size
        hashes = self.ensure_hashes(state, min(num_full, first_private) * self.block_size)
        blocks = self.req_blocks[rid]
        block_hash = self.block_hash
        cached = self.cached
        split = min(max(first_private, start), num_full)
        for i in range(start, split):
            b = blocks[i]
            if block_hash[b] is None:  # prefix hits already carry their hash
                h = hashes[i]
                block_hash[b] = h
                if h in cached:
                    self.duplicates.setdefault(h, []).append(b)
                else:
                    cached[h] = b
        # Private content: a marker instead of a hash. The only blocks there already marked are the
        # request's own, hit again after a preemption, and carry this same marker.
        for i in range(split, num_full):
            block_hash[blocks[i]] = (rid, i)
        self.num_cached_blocks[rid] = num_full

    def remember_private(self, state: ReqState) -> None:
        """Before a preemption frees them: index the request's private blocks, the only ones it alone can
        hit when it is readmitted (a finished request's are never looked for again)."""
        rid = state.request_id
        first_private = state.private_from // self.block_size
        blocks = self.req_blocks.get(rid, ())
        if len(blocks) > first_private:
            own = self.private.setdefault(rid, {})
            block_hash = self.block_hash
            for i in range(first_private, len(blocks)):
                if block_hash[blocks[i]] == (rid, i):
                    own[i] = blocks[i]

    def forget(self, state: ReqState) -> None:
        """A finished request's private blocks can never be hit again: drop their index."""
        self.private.pop(state.request_id, None)

    def free(self, state: ReqState) -> None:
        """Release a finished or preempted request's blocks, last block first (vLLM free order)."""
        rid = state.request_id
        blocks = self.req_blocks.pop(rid, None)
        self.num_cached_blocks.pop(rid, None)
        if not blocks:
            return
        ref = self.ref_cnt
        block_hash = self.block_hash
        lru_append = self.free_lru.append
        evict_first: list[int] = []
        num_lru = 0
        for b in reversed(blocks):
            r = ref[b] - 1
            ref[b] = r
            if not r:
                if block_hash[b] is None:
                    evict_first.append(b)  # vLLM: LIFO reuse of blocks that can never hit
                else:  # vLLM: FIFO (LRU) for cached blocks
                    lru_append(b)
                    num_lru += 1
        self.num_lru += num_lru
        if evict_first:  # vLLM prepends them in this order: the first one ends up at the front
            evict_first.reverse()
            self.free_stack += evict_first

    def _evict(self, block: int, h: int) -> None:
        self.block_hash[block] = None
        if self.cached[h] == block:
            extra = self.duplicates.get(h)
            if extra is None:
                del self.cached[h]
                return
            self.cached[h] = extra.pop(0)
        else:
            extra = self.duplicates[h]
            extra.remove(block)
        if not extra:
            del self.duplicates[h]

    def check(self) -> None:
        """Invariants (tests): every block is free xor referenced; hashes and the cache index agree."""
        referenced = {b for blocks in self.req_blocks.values() for b in blocks}
        entries = Counter(self.free_lru[self.lru_head :])
        if sum(self.stale) != self.num_stale or any(entries[b] < s for b, s in enumerate(self.stale)):
            raise AssertionError("stale free-queue entries miscounted")
        live = [b for b, c in entries.items() if c - self.stale[b] == 1]
        if any(c - self.stale[b] > 1 for b, c in entries.items()):
            raise AssertionError("a block is queued twice")
        free = set(self.free_stack) | set(live)
        if len(free) != len(self.free_stack) + len(live) or len(live) != self.num_lru:
            raise AssertionError("a block is queued twice, or the free count is off")
        if any(self.block_hash[b] is not None for b in self.free_stack):
            raise AssertionError("a hashed block is in the unhashed part of the free queue")
        if referenced & free or len(referenced | free) != self.num_blocks:
            raise AssertionError("KV block conservation violated")
        for h, block in self.cached.items():
            for b in [block, *self.duplicates.get(h, ())]:
                if self.block_hash[b] != h:
                    raise AssertionError(f"block {b} indexed under a hash it does not hold")
        if not self.duplicates.keys() <= self.cached.keys():
            raise AssertionError("duplicate blocks of a hash that is not cached")
