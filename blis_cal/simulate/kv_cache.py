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
chain: nothing else could ever hit them. They count as cached for vLLM's queue order (a request's first
`num_cached_blocks` blocks are the cached ones), and only when a request is preempted do its private
blocks get a (request_id, index) marker, by which it finds them again while they survive in the queue.
Only blocks with a hash can be shared, so reference counts are kept for those alone.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Sequence

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
        self.ref_cnt = [0] * num_gpu_blocks  # requests holding the block (kept for hashed blocks only)
        # Σ (holders − 1) × block size over held blocks: tokens several running requests share (read once).
        self.shared_tokens = 0
        self.block_hash: list[int | tuple[int, int] | None] = [None] * num_gpu_blocks  # hash or marker
        self.num_marked = 0  # blocks carrying a private marker
        self.cached: dict[int, int] = {}  # hash -> the block lookups return (the first one cached)
        self.duplicates: dict[int, list[int]] = {}  # hash -> later blocks with the same content
        self.req_blocks: dict[int, list[int]] = {}
        # Blocks whose content only their request can have carry (request_id, index) instead of a hash; a
        # preempted request finds them again through this index (made at preemption), checked by the marker.
        self.private: dict[int, dict[int, int]] = {}
        self.num_cached_blocks: dict[int, int] = {}
        self.decode_pool: list[int] = []  # blocks popped for lazy decoders, not yet in their req_blocks

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
        evictable = 0
        if new_computed_blocks:
            # A prefix hit (on a request holding no blocks yet) is free unless another request holds it; hits
            # on the request's own private blocks always are (its preemption freed them).
            shared_hits = new_computed_blocks[: state.private_from // bs]
            evictable = (
                len(new_computed_blocks) - len(shared_hits) + sum(1 for b in shared_hits if ref[b] == 0)
            )
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
        if new_computed_blocks:  # a hit on a free block takes it out of the queue
            for b in shared_hits:
                if ref[b] == 0:
                    self._unqueue(b)
                else:
                    self.shared_tokens += bs
                ref[b] += 1
            for b in new_computed_blocks[len(shared_hits) :]:
                self._unqueue(b)
            blocks += new_computed_blocks
        if num_new_blocks:
            blocks += self._take_free(num_new_blocks)
        self.req_blocks[rid] = blocks
        if self.enable_caching:
            self.cache_blocks(state, min(local_computed + num_new_tokens, state.num_tokens))
        return True

    def _unqueue(self, block: int) -> None:
        """Take a free block out of the middle of the queue: its entry stays behind, counted as stale."""
        self.stale[block] += 1
        self.num_stale += 1
        self.num_lru -= 1

    def take_decode_blocks(self, count: int) -> None:
        """Pop `count` blocks for lazily tracked decoding requests crossing a block boundary (fast path of
        allocate_slots; the caller has checked there are enough free blocks). They wait in `decode_pool`
        until their requests claim them."""
        self.decode_pool += self._take_free(count)

    def claim_decode_blocks(self, state: ReqState) -> None:
        """A request leaving the lazy decode set takes the blocks its decode rounds popped. Pool blocks are
        alike (unhashed, never looked up), so which ones it takes only relabels blocks."""
        blocks = self.req_blocks[state.request_id]
        owed = cdiv(state.num_computed, self.block_size) - len(blocks)
        if owed:
            pool = self.decode_pool
            blocks += pool[-owed:]
            del pool[-owed:]

    def _take_free(self, count: int) -> list[int]:
        """Pop `count` blocks from the front of the free queue, evicting their cached content."""
        stack = self.free_stack
        out: list[int] = []
        if stack:  # the front part first: unhashed blocks, top of the stack = front of the queue
            take = min(count, len(stack))
            out = stack[-take:]
            out.reverse()
            del stack[-take:]
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
        if self.cached or self.num_marked:  # else no block has content to evict
            block_hash = self.block_hash
            cached = self.cached
            duplicates = self.duplicates
            for b in taken:
                h = block_hash[b]
                if h is None:
                    continue
                if h.__class__ is tuple:  # a preempted request's private block: no longer its own
                    block_hash[b] = None
                    self.num_marked -= 1
                elif h in duplicates or cached[h] != b:
                    self._evict(b, h)
                else:  # the common case, inlined: the only block holding this content
                    del cached[h]
                    block_hash[b] = None
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
        self.num_cached_blocks[rid] = num_full
        stop = min(num_full, state.private_from // self.block_size)  # private blocks need no hash
        if start >= stop:
            return
        hashes = self.ensure_hashes(state, stop * self.block_size)
        blocks = self.req_blocks[rid]
        block_hash = self.block_hash
        ref = self.ref_cnt
        cached = self.cached
        for i in range(start, stop):
            b = blocks[i]
            if block_hash[b] is None:  # prefix hits already carry their hash (and count this request)
                h = hashes[i]
                block_hash[b] = h
                ref[b] = 1
                if h in cached:
                    self.duplicates.setdefault(h, []).append(b)
                else:
                    cached[h] = b

    def warm(self, segments: Sequence[tuple[str, int]], num_tokens: int) -> None:
        """Cache the full blocks of the first `num_tokens` prompt tokens as free, evictable blocks at the
        back of the free queue (as a previous run leaves them: vLLM keeps a freed block's hash until reuse)."""
        if not self.enable_caching:
            return
        for h in block_hashes(segments, self.block_size)[: num_tokens // self.block_size]:
            if h in self.cached:
                continue
            if not self.num_free:  # added while every block is held: nothing to keep it in
                return
            (b,) = self._take_free(1)
            self.block_hash[b] = h
            self.cached[h] = b
            self.free_lru.append(b)
            self.num_lru += 1

    def remember_private(self, state: ReqState) -> None:
        """Before a preemption frees them: index the request's private blocks, the only ones it alone can
        hit when it is readmitted (a finished request's are never looked for again)."""
        rid = state.request_id
        first_private = state.private_from // self.block_size
        num_cached = self.num_cached_blocks.get(rid, 0)
        if num_cached > first_private:
            blocks = self.req_blocks[rid]
            own = self.private.setdefault(rid, {})
            block_hash = self.block_hash
            for i in range(first_private, num_cached):
                b = blocks[i]
                if block_hash[b] is None:  # else marked already: hit again after an earlier preemption
                    block_hash[b] = (rid, i)
                    self.num_marked += 1
                own[i] = b

    def forget(self, state: ReqState) -> None:
        """A finished request's private blocks can never be hit again: drop their index."""
        self.private.pop(state.request_id, None)

    def free(self, state: ReqState) -> None:
        """Release a finished or preempted request's blocks, last block first (vLLM free order)."""
        rid = state.request_id
        blocks = self.req_blocks.pop(rid, None)
        num_cached = self.num_cached_blocks.pop(rid, 0)
        if not blocks:
            return
        # vLLM: LIFO reuse of uncached blocks (only their request holds them): prepended last-to-first, so
        # the last block ends up at the front.
        self.free_stack += blocks[num_cached:]
        # vLLM: FIFO (LRU) for cached blocks, appended last-to-first; private ones are this request's alone,
        # shared ones join when no other request holds them.
        split = min(num_cached, state.private_from // self.block_size)
        lru = self.free_lru
        size = len(lru)
        lru += reversed(blocks[split:num_cached])
        ref = self.ref_cnt
        for i in range(split - 1, -1, -1):
            b = blocks[i]
            r = ref[b] - 1
            ref[b] = r
            if not r:
                lru.append(b)
            else:
                self.shared_tokens -= self.block_size
        self.num_lru += len(lru) - size

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
        referenced = {b for blocks in self.req_blocks.values() for b in blocks} | set(self.decode_pool)
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
        for rid, blocks in self.req_blocks.items():
            if any(self.block_hash[b] is not None for b in blocks[self.num_cached_blocks.get(rid, 0) :]):
                raise AssertionError(f"request {rid} holds a hashed block past its cached ones")
        if sum(h.__class__ is tuple for h in self.block_hash) != self.num_marked:
            raise AssertionError("private markers miscounted")
        if referenced & free or len(referenced | free) != self.num_blocks:
            raise AssertionError("KV block conservation violated")
        for h, block in self.cached.items():
            for b in [block, *self.duplicates.get(h, ())]:
                if self.block_hash[b] != h:
                    raise AssertionError(f"block {b} indexed under a hash it does not hold")
        held = Counter(b for blocks in self.req_blocks.values() for b in blocks)
        if self.shared_tokens != sum(c - 1 for c in held.values()) * self.block_size:
            raise AssertionError("shared tokens miscounted")
        if not self.duplicates.keys() <= self.cached.keys():
            raise AssertionError("duplicate blocks of a hash that is not cached")
