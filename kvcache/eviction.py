# TEMPORARY placeholder written by the other engineer so the store can be tested;
# the eviction helper owns this file and should overwrite it entirely.
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import ClassVar, Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)


class EvictionPolicy(Protocol[K]):
    name: ClassVar[str]

    def insert(self, key: K, parent: K | None) -> None: ...
    def touch(self, key: K) -> None: ...
    def remove(self, key: K) -> None: ...
    def pop_victim(self, is_pinned: Callable[[K], bool]) -> K | None: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: object) -> bool: ...


class LRUPolicy(Generic[K]):
    name: ClassVar[str] = "lru"

    def __init__(self, capacity: int = 0) -> None:
        self._order: OrderedDict[K, None] = OrderedDict()

    def insert(self, key: K, parent: K | None) -> None:
        self._order[key] = None

    def touch(self, key: K) -> None:
        self._order.move_to_end(key)

    def remove(self, key: K) -> None:
        self._order.pop(key, None)

    def pop_victim(self, is_pinned: Callable[[K], bool]) -> K | None:
        for key in self._order:
            if not is_pinned(key):
                del self._order[key]
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order


def make_policy(name: str, capacity_blocks: int) -> EvictionPolicy[K]:
    return LRUPolicy(capacity_blocks)
