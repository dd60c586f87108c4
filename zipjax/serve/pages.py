"""Host-side bookkeeping of the KV page pool: the free list, reference counts, and the prefix cache.

Pages are numbered 1 .. num_pages - 1 (page 0 is the null page padding tokens write). A page is in exactly one of
three states, so `free + cached + used == num_pages - 1` always holds:

    used     referenced by at least one sequence in flight
    cached   referenced by none, but holding a full page of a known prefix (kept for a later request; evicted least
             recently used first when the free list runs dry)
    free     nothing worth keeping

The prefix cache keys a full page by a hash chain: the page's tokens, the key of the page before it, and a salt
(the KV method and the expert), so a page is shared only by requests whose whole prefix up to and including it is
the same token for token, under the same weights and cache representation. Keys are 128-bit BLAKE2b digests.
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np

from zipjax.serve.paged import NULL_PAGE


def page_key(parent: bytes, tokens: np.ndarray | list[int], salt: bytes) -> bytes:
    """The prefix-cache key of a full page holding `tokens`, after the page keyed `parent` (b"" for the first)."""
    data = np.asarray(tokens, np.int64).tobytes()
    return hashlib.blake2b(parent + salt + data, digest_size=16).digest()


class PageTable:
    """Allocation, sharing and prefix caching of pages (see the module docstring)."""

    def __init__(self, num_pages: int, page_size: int, *, prefix_cache: bool = True):
        self.num_pages, self.page_size, self.prefix_cache = num_pages, page_size, prefix_cache
        self.refs = np.zeros((num_pages,), np.int32)
        self.free: collections.deque[int] = collections.deque(p for p in range(num_pages) if p != NULL_PAGE)
        self.by_key: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, LRU first
        self.hit_tokens = 0
        self.query_tokens = 0

    @property
    def capacity(self) -> int:
        """Pages sequences can hold (all but the null page)."""
        return self.num_pages - 1

    def counts(self) -> dict[str, int]:
        cached = len(self.evictable)
        return {"pages_total": self.capacity, "pages_free": len(self.free), "pages_cached": cached,
                "pages_used": self.capacity - len(self.free) - cached}

    def available(self) -> int:
        """Pages an allocation can get now (free, or cached and evictable)."""
        return len(self.free) + len(self.evictable)

    def allocate(self) -> int | None:
        """A page with one reference, or None when every page is in use."""
        if self.free:
            page = self.free.popleft()
        elif self.evictable:
            page, _ = self.evictable.popitem(last=False)
            del self.by_key[self.key_of.pop(page)]
        else:
            return None
        self.refs[page] = 1
        return page

    def release(self, pages: list[int]) -> None:
        """Drop one reference to each page; a page no one holds is kept cached if it has a key, else freed."""
        for page in pages:
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if page in self.key_of:
                    self.evictable[page] = None
                else:
                    self.free.append(page)

    def match(self, keys: list[bytes]) -> list[int]:
        """The cached pages of the longest prefix of `keys`, each with a new reference."""
        pages = []
        for key in keys:
            page = self.by_key.get(key) if self.prefix_cache else None
            if page is None:
                break
            if self.refs[page] == 0:
                del self.evictable[page]
            self.refs[page] += 1
            pages.append(page)
        return pages

    def forget(self, page: int) -> None:
        """Drop the page's prefix key (its contents will not be what the key says)."""
        key = self.key_of.pop(page, None)
        if key is not None:
            del self.by_key[key]

    def register(self, page: int, key: bytes) -> None:
        """Record that `page` (full, held by a sequence) is the page keyed `key`; a key already cached keeps its
        first page (this one is then freed normally when released)."""
        if self.prefix_cache and key not in self.by_key and page not in self.key_of:
            self.by_key[key] = page
            self.key_of[page] = key
