"""A model of PyTorch's CUDA caching allocator, replayed over a step's allocation order.

`CachingAllocator` follows c10/cuda/CUDACachingAllocator.cpp (the native backend, PyTorch 2.x):

- every request is rounded up to a multiple of 512 bytes (`kMinBlockSize`; `round_size`);
- requests <= 1 MiB (`kSmallSize`) come from the small pool, packed into 2 MiB segments
  (`kSmallBuffer`); larger ones from the large pool: < 10 MiB (`kMinLargeAlloc`) get a 20 MiB
  segment (`kLargeBuffer`), larger ones a segment of their size rounded up to 2 MiB (`kRoundLarge`)
  (`get_allocation_size`);
- a free block is found best-fit — the smallest cached block of the same pool **and the same
  stream** that is large enough, lowest address on ties (`get_free_block`: `lower_bound` on
  (stream, size, address)); blocks freed on one stream are never handed to another;
- a found block is split when the rest is worth keeping (`should_split`): small pool if the
  remainder is >= 512 B, large pool if it is > 1 MiB; otherwise the whole block is handed out
  (and counted by `memory_allocated`, which sums block sizes, not requests);
- a freed block merges with its free neighbours of the same segment (`free_block`, `try_merge_blocks`);
- when a new segment would not fit the device (`capacity`), every cached block that is not split
  is released (`release_cached_blocks`) and the allocation retried; if that fails too it is an OOM;
- `expandable_segments=True`: one growing segment per stream and pool, mapped in 2 MiB (small) or
  20 MiB (large) pages (`ExpandableSegment`, `find_expandable_block`, `map_block`); a request that no
  cached block fits extends the free block at the segment's end, and blocks split whenever the rest
  is >= 512 B.

Not modelled: `max_split_size_mb` / `roundup_power2_divisions` / garbage collection (off by default),
CUDA graph pools, and frees deferred by `record_stream` events (FSDP2 and the Trainer's step do not
use `record_stream`; FSDP1 does for its all-gather outputs).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

MIN_BLOCK = 512  # kMinBlockSize
SMALL_SIZE = 1 << 20  # kSmallSize: largest "small" request
SMALL_BUFFER = 2 << 20  # kSmallBuffer: small-pool segment
LARGE_BUFFER = 20 << 20  # kLargeBuffer: segment for 1-10 MiB requests
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
ROUND_LARGE = 2 << 20  # kRoundLarge


def round_size(nbytes: int) -> int:
    """What the allocator hands out for a request of `nbytes` (before splitting rules)."""
    if nbytes < MIN_BLOCK:
        return MIN_BLOCK
    return MIN_BLOCK * ((nbytes + MIN_BLOCK - 1) // MIN_BLOCK)


def allocation_size(size: int) -> int:
    """Size of the segment cudaMalloc'd for a rounded request that no cached block fits."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * ((size + ROUND_LARGE - 1) // ROUND_LARGE)


class OutOfMemory(Exception):
    """The request does not fit `capacity` even after releasing every unsplit cached block."""


class Block:
    __slots__ = ("addr", "size", "stream", "small", "allocated", "prev", "next", "segment", "requested")

    def __init__(self, addr: int, size: int, stream: str, small: bool, segment: int):
        self.addr, self.size, self.stream, self.small, self.segment = addr, size, stream, small, segment
        self.allocated = False
        self.prev: Block | None = None
        self.next: Block | None = None
        self.requested = 0

    @property
    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None

    def key(self) -> tuple:
        return (self.size, self.addr)


@dataclass
class AllocatorStats:
    """What torch.cuda.memory_stats would report for the replayed sequence."""

    peak_allocated: int = 0  # max of memory_allocated(): sum of handed-out block sizes
    peak_reserved: int = 0  # max of memory_reserved(): sum of segments (mapped pages)
    peak_requested: int = 0  # max of the sum of requested bytes (what a storage counter sees)
    allocated: int = 0
    reserved: int = 0
    requested: int = 0
    segments: int = 0
    releases: int = 0  # release_cached_blocks() calls forced by `capacity`
    reserved_by_stream: dict[str, int] = field(default_factory=dict)


class CachingAllocator:
    """Replays mallocs and frees the way c10's native CUDA caching allocator serves them (see module doc)."""

    def __init__(self, *, expandable_segments: bool = False, capacity: int | None = None):
        self.expandable = expandable_segments
        self.capacity = capacity
        self.stats = AllocatorStats()
        self._pools: dict[tuple[str, bool], list[tuple[int, int, Block]]] = {}
        self._next_addr = 0
        self._segments: dict[int, int] = {}  # segment id -> reserved bytes
        self._seg_stream: dict[int, tuple[str, bool]] = {}
        self._tails: dict[tuple[str, bool], tuple[int, Block | None, int]] = {}  # expandable: (segment, last block, mapped end)

    # ---- pools -----------------------------------------------------------------------
    def _pool(self, stream: str, small: bool) -> list:
        return self._pools.setdefault((stream, small), [])

    def _insert(self, b: Block) -> None:
        bisect.insort(self._pool(b.stream, b.small), (b.size, b.addr, b))

    def _remove(self, b: Block) -> None:
        pool = self._pool(b.stream, b.small)
        i = bisect.bisect_left(pool, (b.size, b.addr))
        while pool[i][2] is not b:
            i += 1
        del pool[i]

    def _best_fit(self, stream: str, small: bool, size: int) -> Block | None:
        pool = self._pool(stream, small)
        i = bisect.bisect_left(pool, (size, -1))
        if i == len(pool):
            return None
        b = pool[i][2]
        del pool[i]
        return b

    # ---- segments ----------------------------------------------------------------------
    def _reserve(self, seg: int, nbytes: int) -> None:
        self._segments[seg] = self._segments.get(seg, 0) + nbytes
        st = self.stats
        st.reserved += nbytes
        stream = self._seg_stream[seg][0]
        st.reserved_by_stream[stream] = st.reserved_by_stream.get(stream, 0) + nbytes
        st.peak_reserved = max(st.peak_reserved, st.reserved)

    def _new_segment(self, stream: str, small: bool, nbytes: int) -> Block:
        if self.capacity is not None and self.stats.reserved + nbytes > self.capacity:
            self.release_cached_blocks()
            if self.stats.reserved + nbytes > self.capacity:
                raise OutOfMemory(f"{nbytes} bytes on {stream}: reserved {self.stats.reserved} of {self.capacity}")
        seg = len(self._seg_stream)
        self._seg_stream[seg] = (stream, small)
        b = Block(self._next_addr, nbytes, stream, small, seg)
        self._next_addr += nbytes
        self.stats.segments += 1
        self._reserve(seg, nbytes)
        return b

    def release_cached_blocks(self) -> None:
        """torch.cuda.empty_cache(): give back every cached segment that is one whole free block."""
        self.stats.releases += 1
        for pool in self._pools.values():
            keep = []
            for size, addr, b in pool:
                if not b.is_split and not self.expandable:
                    seg = b.segment
                    self.stats.reserved -= self._segments.pop(seg)
                    self.stats.reserved_by_stream[b.stream] -= size
                    self.stats.segments -= 1
                else:
                    keep.append((size, addr, b))
            pool[:] = keep

    def _expandable_block(self, stream: str, small: bool, size: int) -> Block:
        """find_expandable_block + map_block: extend the free block at the end of the stream's segment."""
        page = SMALL_BUFFER if small else LARGE_BUFFER
        key = (stream, small)
        if key not in self._tails:
            seg = len(self._seg_stream)
            self._seg_stream[seg] = key
            self._segments[seg] = 0
            self.stats.segments += 1
            base = self._next_addr
            self._next_addr += 1 << 50  # a segment reserves a huge virtual range
            self._tails[key] = (seg, None, base)
        seg, last, end = self._tails[key]
        start = end
        have = 0
        if last is not None and not last.allocated:
            self._remove(last)
            start, have = last.addr, last.size
        need = size - have
        mapped = page * ((need + page - 1) // page)
        if self.capacity is not None and self.stats.reserved + mapped > self.capacity:
            if last is not None and not last.allocated:
                self._insert(last)
            raise OutOfMemory(f"{mapped} bytes mapped on {stream}: reserved {self.stats.reserved} of {self.capacity}")
        self._reserve(seg, mapped)
        if last is not None and not last.allocated:
            b = last
            b.size += mapped
        else:
            b = Block(start, mapped, stream, small, seg)
            b.prev = last
            if last is not None:
                last.next = b
        self._tails[key] = (seg, b, start + b.size)
        return b

    # ---- malloc / free -----------------------------------------------------------------
    def _should_split(self, b: Block, size: int) -> bool:
        rest = b.size - size
        if b.small or self.expandable:
            return rest >= MIN_BLOCK
        return rest > SMALL_SIZE

    def malloc(self, nbytes: int, stream: str = "default") -> Block:
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        b = self._best_fit(stream, small, size)
        if b is None:
            b = self._expandable_block(stream, small, size) if self.expandable else \
                self._new_segment(stream, small, allocation_size(size))
        if self._should_split(b, size):
            rest = Block(b.addr + size, b.size - size, stream, small, b.segment)
            rest.prev, rest.next = b, b.next
            if b.next is not None:
                b.next.prev = rest
            b.next = rest
            b.size = size
            self._insert(rest)
            if self.expandable:
                seg, last, end = self._tails[(stream, small)]
                if last is b:
                    self._tails[(stream, small)] = (seg, rest, end)
        b.allocated = True
        b.requested = nbytes
        st = self.stats
        st.allocated += b.size
        st.requested += nbytes
        st.peak_allocated = max(st.peak_allocated, st.allocated)
        st.peak_requested = max(st.peak_requested, st.requested)
        return b

    def free(self, b: Block) -> None:
        if not b.allocated:
            raise ValueError("double free")
        b.allocated = False
        self.stats.allocated -= b.size
        self.stats.requested -= b.requested
        tail_key = (b.stream, b.small)
        for nb in (b.prev, b.next):
            if nb is not None and not nb.allocated:
                self._remove(nb)
                if nb is b.prev:
                    b.addr = nb.addr
                    b.prev = nb.prev
                    if nb.prev is not None:
                        nb.prev.next = b
                else:
                    b.next = nb.next
                    if nb.next is not None:
                        nb.next.prev = b
                b.size += nb.size
                if self.expandable and self._tails.get(tail_key, (None, None))[1] is nb:
                    seg, _, end = self._tails[tail_key]
                    self._tails[tail_key] = (seg, b, end)
        self._insert(b)


def stream_of(tag: str) -> str:
    """The CUDA stream an allocation tagged `tag` is made on.

    A tag may name its stream after '@' ("fsdp_all_gather@all_gather_copy_in"). Otherwise: FSDP2's
    reduce-scatter code allocates on the reduce-scatter stream (its input, the sharded gradient); its
    all-gather copy-out (the unsharded parameters) and everything else on the default stream — the flat
    all-gather buffers FSDP2 allocates on its copy-in stream need the '@' form to get their own pool.
    """
    if "@" in tag:
        return tag.split("@", 1)[1]
    if "reduce_scatter" in tag:
        return "reduce_scatter"
    return "default"


def replay(events, *, expandable_segments: bool = False, capacity: int | None = None,
           skip_streams: tuple[str, ...] = ("host",)) -> AllocatorStats:
    """Replay `events` — (kind, key, nbytes, tag) with kind 1 = malloc, 0 = free, as the tracker logs
    them — and return the stats. Each malloc goes to `stream_of(tag)`.

    Frees of keys never allocated (storages born before logging started) are ignored; storages on
    `skip_streams` (host RAM) never reach the device allocator.
    """
    a = CachingAllocator(expandable_segments=expandable_segments, capacity=capacity)
    live: dict = {}
    for kind, key, nbytes, tag in events:
        if kind:
            stream = stream_of(tag) if tag not in skip_streams else tag
            if nbytes and stream not in skip_streams:
                live[key] = a.malloc(nbytes, stream)
        else:
            b = live.pop(key, None)
            if b is not None:
                a.free(b)
    return a.stats


def summary(events) -> dict:
    """What a dry run reports from its event log: the replay's peaks, plain and with expandable segments."""
    plain = replay(events)
    exp = replay(events, expandable_segments=True)
    return {"requested": plain.peak_requested, "allocated": plain.peak_allocated, "reserved": plain.peak_reserved,
            "reserved_expandable": exp.peak_reserved, "by_stream": dict(plain.reserved_by_stream)}
