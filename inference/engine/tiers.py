"""KV tiers: cache pages kept in device memory, host memory or a file on disk, each up to a budget.

The BlockManager hands out *logical* page ids (1 .. device + host + disk pages) and never learns
where a page lives; this layer maps each logical page to a physical place: a page of the device
pool (PagedCache.pool, what the model reads and writes), a page of the host buffer (pinned when
the device is a GPU) or a page of a file under kv_disk_path (a numpy memmap, raw bytes: no pickle; the file is
unlinked once mapped, so it never outlives the process).
A page handed out anew has no place until a step first needs it (it is all zeros then).

Before each step the runner calls `stage()` with the step's sequences (the scheduler has already
chosen them, so this is prefetch ahead of use): their pages are brought into the device tier,
least recently used pages of other sequences going down one tier to make room (device -> host ->
disk); a page used more than once gets a second chance before it is evicted ("recency and reuse").
Copies are `non_blocking` (asynchronous from pinned host memory on a GPU; on the CPU they are plain
copies). Two ways a model can use the tiers:

- whole pages (every model): every page of the step's sequences is staged, and the block tables the
  model sees name device pages only. The scheduler keeps a step's pages within the device tier
  (`step_page_limit`), and a sequence can be no longer than the device tier holds.
- selective reads (models with `reads_kv_through_tiers`, DeepSeek-V4): only the pages the step
  writes must be staged; the rest of the step's pages are prefetched while the device tier has room,
  and a page left in a slower tier appears in the block tables as `-1 - logical id`: the model reads
  it with `gather()`, which fetches only the entries (and the columns) it asks for: V4's compressed
  sparse attention fetches the indexer keys of every entry but the compressed K/V of only the
  `index_topk` entries the indexer selects. A sequence may then be as long as all tiers hold.

Counters (engine stats, exported by the worker's /metrics): bytes per tier in use (pages placed
there; a freed page keeps its place until it is handed out again) and at peak,
kv_tier_hits / kv_tier_misses (pages a step used that were / were not in the device tier when the
step was staged), kv_prefetch_hits (missed pages staged before the step) / kv_prefetch_misses (pages
a step had to fetch while it ran), kv_evictions (pages moved down a tier), kv_bytes_transferred.
"""

from __future__ import annotations

import os
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from .cache import CacheSpec, page_views
from .sequence import Sequence

UNPLACED, DEVICE, HOST, DISK = 0, 1, 2, 3
TIER_NAMES = {DEVICE: "device", HOST: "host", DISK: "disk"}


class KVTiers:
    def __init__(
        self,
        spec: CacheSpec,
        block_size: int,
        device_pool: torch.Tensor,
        host_pages: int,
        disk_pages: int,
        disk_path: str | None,
        selective: bool,
    ):
        self.spec, self.block_size, self.selective = spec, block_size, selective
        self.device = device_pool.device
        self.page_bytes = device_pool.shape[1]
        device_pages = device_pool.shape[0] - 1  # page 0 is the null page
        self.num_logical = device_pages + host_pages + disk_pages
        self.capacity = {DEVICE: device_pages, HOST: host_pages, DISK: disk_pages}
        self.pools: dict[int, torch.Tensor] = {DEVICE: device_pool}
        if host_pages:
            pin = self.device.type == "cuda"
            self.pools[HOST] = torch.empty(host_pages, self.page_bytes, dtype=torch.uint8, pin_memory=pin)
        self.disk_file: Path | None = None
        if disk_pages:
            folder = Path(disk_path)
            folder.mkdir(parents=True, exist_ok=True)
            self.disk_file = folder / f"kv-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin"
            self._memmap = np.memmap(
                self.disk_file, dtype=np.uint8, mode="w+", shape=(disk_pages, self.page_bytes)
            )
            self.pools[DISK] = torch.from_numpy(self._memmap)
            # Unlinked at once: the mapping keeps the space until the engine goes, and a crashed
            # process leaves no file behind.
            self.disk_file.unlink()
        self.views = {tier: page_views(spec, pool, block_size) for tier, pool in self.pools.items()}
        # Where each logical page is: tier and index in that tier's pool (device pages count from 1).
        self.tier = np.zeros(self.num_logical + 1, dtype=np.int8)
        self.index = np.zeros(self.num_logical + 1, dtype=np.int64)
        self.tier[0] = DEVICE  # the null page
        self.device_map = torch.arange(self.num_logical + 1, dtype=torch.long).neg_().sub_(1)
        self.device_map[0] = 0
        """[logical] -> device page, or -1 - logical for a page not in the device tier."""
        first = {DEVICE: 1, HOST: 0, DISK: 0}
        self.free = {t: list(range(first[t] + self.capacity[t] - 1, first[t] - 1, -1)) for t in self.capacity}
        self.recency: dict[int, OrderedDict[int, int]] = {t: OrderedDict() for t in self.capacity}
        """Per tier, logical page -> uses, least recently used first."""
        self.peak = {t: 0 for t in self.capacity}
        self.counters = dict.fromkeys(
            (
                "kv_tier_hits",
                "kv_tier_misses",
                "kv_prefetch_hits",
                "kv_prefetch_misses",
                "kv_evictions",
                "kv_bytes_transferred",
            ),
            0,
        )
        self._fetched: set[int] = set()  # pages the running step fetched while it ran
        self._in_flight = False  # device-to-host copies the CPU has not waited for (GPU only)

    # -- the runner's calls --------------------------------------------------------------------

    def new_pages(self, pages: list[int]) -> None:
        """Pages just handed out anew: their old contents are dropped (a new page reads as zeros)."""
        for page in pages:
            tier = int(self.tier[page])
            if tier != UNPLACED:
                self._release(page, tier)

    def stage(self, seqs: list[Sequence], counts: list[int]) -> None:
        """Bring the step's pages into the device tier before the step runs (see the module docstring)."""
        self._flush_fetched()
        pinned: set[int] = {0}
        required, optional = [], []
        for seq, count in zip(seqs, counts, strict=True):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + count
            for group, table in zip(self.spec.paged_groups, seq.block_tables, strict=True):
                if not self.selective:
                    required += table
                    continue
                per_page = self.spec.page_entries(group, self.block_size)
                first = start // group.tokens_per_entry // per_page
                last = min((end - 1) // group.tokens_per_entry // per_page, len(table) - 1)
                required += table[first : last + 1]
                optional += reversed(table[:first])  # the most recent pages first
        # Pages already on the device stay (required ones first), so a step never evicts its own pages
        # to make room for others of its own: the device keeps a stable share of a long sequence.
        self._pin_resident(required, pinned)
        for page in required:
            if not self._to_device(page, pinned):
                raise RuntimeError(
                    f"the device KV tier ({self.capacity[DEVICE]} pages) cannot hold the {len(set(required))} "
                    "pages this step writes: raise kv_device_bytes"
                )
        self._pin_resident(optional, pinned)
        for page in optional:
            if not self._to_device(page, pinned):
                break  # the device tier is full of this step's pages: the rest is read where it is

    def on_device(self, pages: list[int]) -> list[int]:
        """The device pages of logical `pages`, brought into the device tier first where they are not.

        For pages no block table names (the prefix cache's slot snapshots, engine/prefix_cache.py), read
        or written before the step is staged: staging may then move them down a tier again."""
        pinned: set[int] = {0}
        for page in pages:
            if not self._to_device(page, pinned):
                raise RuntimeError(f"the device KV tier ({self.capacity[DEVICE]} pages) cannot hold {len(pages)} pages")
        return [int(self.device_map[page]) for page in pages]

    def gather(
        self, group: str, layer: int, pages: torch.Tensor, offsets: torch.Tensor, columns: slice
    ) -> torch.Tensor:
        """Entries `offsets` of `pages` (device pages, or -1 - logical id) of one layer, `columns` of each."""
        device_view = self.views[DEVICE][group][layer][..., columns]
        out = device_view[pages.clamp(min=0), offsets]
        missing = pages < 0
        if not bool(missing.any()):
            return out
        logical = (-1 - pages[missing]).cpu().numpy()
        rows = offsets.expand_as(pages)[missing].cpu().numpy()
        tiers, index = self.tier[logical], self.index[logical]
        fetched = torch.zeros((len(logical), *out.shape[pages.dim() :]), dtype=out.dtype, device=out.device)
        self._settle()
        for tier in (HOST, DISK):
            take = np.nonzero(tiers == tier)[0]
            if len(take):
                view = self.views[tier][group][layer][..., columns]
                part = view[torch.from_numpy(index[take]), torch.from_numpy(rows[take])]
                fetched[torch.from_numpy(take).to(out.device)] = part.to(out.device, non_blocking=True)
        out[missing] = fetched
        self.counters["kv_bytes_transferred"] += fetched.numel() * fetched.element_size()
        self._fetched.update(np.unique(logical).tolist())
        return out

    def stats(self) -> dict:
        stats = dict(self.counters)
        stats["kv_prefetch_misses"] += len(self._fetched)
        stats["kv_tier_misses"] += len(self._fetched)
        for tier, name in TIER_NAMES.items():
            stats[f"kv_{name}_bytes"] = len(self.recency[tier]) * self.page_bytes
            stats[f"kv_{name}_peak_bytes"] = self.peak[tier] * self.page_bytes
            stats[f"kv_{name}_capacity_bytes"] = self.capacity[tier] * self.page_bytes
        return stats

    # -- moving pages ----------------------------------------------------------------------------

    def _flush_fetched(self) -> None:
        self.counters["kv_prefetch_misses"] += len(self._fetched)
        self.counters["kv_tier_misses"] += len(self._fetched)
        self._fetched.clear()

    def _pin_resident(self, pages: list[int], pinned: set[int]) -> None:
        order = self.recency[DEVICE]
        for page in pages:
            if page not in pinned and self.tier[page] == DEVICE:
                order[page] = order.pop(page) + 1
                pinned.add(page)
                self.counters["kv_tier_hits"] += 1

    def _to_device(self, page: int, pinned: set[int]) -> bool:
        """Make `page` a device page for this step (pinned); False when only pinned pages could make room."""
        if page in pinned:
            return True
        tier = int(self.tier[page])
        if tier == DEVICE:
            uses = self.recency[DEVICE].pop(page)
            self.recency[DEVICE][page] = uses + 1
            pinned.add(page)
            self.counters["kv_tier_hits"] += 1
            return True
        source = None
        if not self.free[DEVICE]:
            if not self._evictable(DEVICE, pinned):
                return False
            if tier != UNPLACED:  # keep its bytes: the eviction below may reuse its slot
                source = self.pools[tier][int(self.index[page])].to(self.device, copy=True)
                self._release(page, tier)
            self._evict(DEVICE, pinned)
        elif tier != UNPLACED:
            source = self.pools[tier][int(self.index[page])]
        slot = self.free[DEVICE].pop()
        if source is None:
            self.pools[DEVICE][slot].zero_()
        else:
            self.pools[DEVICE][slot].copy_(source, non_blocking=True)
            if int(self.tier[page]) != UNPLACED:
                self._release(page, int(self.tier[page]))
            self.counters["kv_tier_misses"] += 1
            self.counters["kv_prefetch_hits"] += 1
            self.counters["kv_bytes_transferred"] += self.page_bytes
        self._place(page, DEVICE, slot)
        pinned.add(page)
        return True

    def _evictable(self, tier: int, pinned: set[int]) -> bool:
        return len(self.recency[tier]) > len(pinned & self.recency[tier].keys()) if tier == DEVICE else True

    def _evict(self, tier: int, pinned: set[int]) -> None:
        """Move the least recently used (unpinned, second chance for reused) page of `tier` one tier down."""
        order = self.recency[tier]
        while True:
            victim, uses = next((p, u) for p, u in order.items() if p not in pinned)
            if uses > 1:
                order.pop(victim)
                order[victim] = 1  # used again since it came in: one more round before it goes
                continue
            break
        lower = next((t for t in (HOST, DISK) if t > tier and self.capacity[t]), None)
        if lower is None:
            raise RuntimeError("the KV tiers are full: raise kv_host_bytes or kv_disk_bytes")
        if not self.free[lower]:
            self._evict(lower, pinned)
        slot = self.free[lower].pop()
        if tier == HOST:
            self._settle()  # the CPU reads the host page: its copy from the device must have landed
        self.pools[lower][slot].copy_(self.pools[tier][int(self.index[victim])], non_blocking=True)
        self._in_flight = self._in_flight or (tier == DEVICE and self.device.type == "cuda")
        self._release(victim, tier)
        self._place(victim, lower, slot)
        self.counters["kv_evictions"] += 1
        self.counters["kv_bytes_transferred"] += self.page_bytes

    def _settle(self) -> None:
        """Wait for asynchronous device-to-host copies before the CPU reads host pages (GPU only)."""
        if self._in_flight:
            torch.cuda.current_stream(self.device).synchronize()
            self._in_flight = False

    def _place(self, page: int, tier: int, slot: int) -> None:
        self.tier[page], self.index[page] = tier, slot
        self.recency[tier][page] = 1
        self.peak[tier] = max(self.peak[tier], len(self.recency[tier]))
        self.device_map[page] = slot if tier == DEVICE else -1 - page

    def _release(self, page: int, tier: int) -> None:
        self.recency[tier].pop(page)
        self.free[tier].append(int(self.index[page]))
        self.tier[page] = UNPLACED
        self.device_map[page] = -1 - page
