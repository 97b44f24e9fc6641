"""Stock in several locations (warehouses) of one sale: the pieces of the
wire format that requests, replies and log events share (PROTOCOL.md
§5.9, §5.10a, §5.12, §6.2a).

A location is named by a ``u16`` id (the retailer's warehouse number). A
sale made without locations has one, id 0. A *region* (a ``u16``, not 0)
maps shoppers to an order of locations. This module holds the locations
section of SALE_CREATE (flag bit 2), which the SALE_CREATED_AT event
carries too, and the ``n u8, n × location u16`` lists of REGION_SET and
RESERVE_AT. ``stampede.messages`` re-exports ``SaleLocations``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar, Iterable, List, Mapping, Sequence, Tuple, Union

from .errors import InvalidRequest, Malformed
from .limits import LOCATIONS_PER_SALE_MAX, REGIONS_PER_SALE_MAX, RESERVE_PREFS_MAX
from .wire import Reader

_U16 = struct.Struct("<H")


def pack_ids(ids: Sequence[int], what: str) -> bytes:
    """``n u8`` then ``n`` location ids, 1..=``RESERVE_PREFS_MAX`` of them
    (a region's order); ``InvalidRequest`` out of range."""
    if not 1 <= len(ids) <= RESERVE_PREFS_MAX:
        raise InvalidRequest("%s of %d locations; allowed 1..=%d" % (what, len(ids), RESERVE_PREFS_MAX))
    return bytes((len(ids),)) + struct.pack("<%dH" % len(ids), *ids)


def pack_regions(regions: Sequence[Tuple[int, Sequence[int]]]) -> bytes:
    """``regions u8``, then per region ``region u16`` and its order
    (``pack_ids``): the regions section of SALE_CREATE and LOCATIONS."""
    parts = [bytes((len(regions),))]
    for region, order in regions:
        parts.append(_U16.pack(region))
        parts.append(pack_ids(order, "region %d" % region))
    return b"".join(parts)


def read_regions(r: Reader) -> List[Tuple[int, List[int]]]:
    """The inverse of ``pack_regions``: over ``REGIONS_PER_SALE_MAX`` is ``Malformed``."""
    count = r.u8()
    if count > REGIONS_PER_SALE_MAX:
        raise Malformed("%s: %d regions, at most %d" % (r.what, count, REGIONS_PER_SALE_MAX))
    regions = []
    for _ in range(count):
        region = r.u16()
        regions.append((region, read_ids(r)))
    return regions


def read_ids(r: Reader) -> List[int]:
    """The inverse of ``pack_ids``: a count out of 1..=8 is ``Malformed``."""
    n = r.u8()
    if not 1 <= n <= RESERVE_PREFS_MAX:
        raise Malformed("%s: a region of %d locations, allowed 1..=%d" % (r.what, n, RESERVE_PREFS_MAX))
    return [r.u16() for _ in range(n)]


@dataclass
class SaleLocations:
    """A sale's locations with their initial stock, in the order they are
    added (the sale's default order), and its regions' orders:

    - ``locations``: ``(location, stock)`` pairs, 1..=16 of them (distinct
      ids; the sale's ``stock`` must be their sum);
    - ``regions``: ``(region, [location, ...])`` pairs, 0..=16 of them
      (region not 0, each order 1..=8 distinct locations of the sale).

    The counts are wire limits (checked here: ``InvalidRequest`` on encode,
    ``Malformed`` on decode); repeated ids, region 0 or a stock that does
    not add up are the server's to refuse (``invalid_argument``)."""

    locations: List[Tuple[int, int]]
    regions: List[Tuple[int, List[int]]] = field(default_factory=list)

    _LOC: ClassVar[struct.Struct] = struct.Struct("<HQ")

    @classmethod
    def of(
        cls,
        locations: Union[Mapping[int, int], Iterable[Tuple[int, int]]],
        regions: Union[Mapping[int, Sequence[int]], Iterable[Tuple[int, Sequence[int]]], None] = None,
    ) -> "SaleLocations":
        """From ``{location: stock}`` (or pairs) and ``{region: order}``
        (or pairs); dicts keep their insertion order."""
        pairs = list(locations.items()) if isinstance(locations, Mapping) else list(locations)
        if regions is None:
            orders: List[Tuple[int, Sequence[int]]] = []
        elif isinstance(regions, Mapping):
            orders = list(regions.items())
        else:
            orders = list(regions)
        return cls([(loc, stock) for loc, stock in pairs], [(region, list(order)) for region, order in orders])

    @property
    def stock(self) -> int:
        """The sum of the locations' stock: what SALE_CREATE's ``stock``
        must be."""
        return sum(stock for _, stock in self.locations)

    def encode(self) -> bytes:
        if not 1 <= len(self.locations) <= LOCATIONS_PER_SALE_MAX:
            raise InvalidRequest(
                "%d locations; allowed 1..=LOCATIONS_PER_SALE_MAX (%d)" % (len(self.locations), LOCATIONS_PER_SALE_MAX)
            )
        if len(self.regions) > REGIONS_PER_SALE_MAX:
            raise InvalidRequest("%d regions; at most REGIONS_PER_SALE_MAX (%d)" % (len(self.regions), REGIONS_PER_SALE_MAX))
        parts = [bytes((len(self.locations),))]
        parts.extend(self._LOC.pack(location, stock) for location, stock in self.locations)
        parts.append(pack_regions(self.regions))
        return b"".join(parts)

    @classmethod
    def read(cls, r: Reader) -> "SaleLocations":
        count = r.u8()
        if not 1 <= count <= LOCATIONS_PER_SALE_MAX:
            raise Malformed("%s: %d locations, allowed 1..=%d" % (r.what, count, LOCATIONS_PER_SALE_MAX))
        locations = [(int(loc), int(stock)) for loc, stock in (r.unpack(cls._LOC) for _ in range(count))]
        return cls(locations, read_regions(r))
