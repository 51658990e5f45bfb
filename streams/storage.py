"""Where each record kind is stored: its table spec and its row builder.

Columns come from the record's own fields (records are defined once), in the
order the sink's COPY expects.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any, Callable

import msgspec

from infra.db.sink import TableSpec
from streams.records import RECORD_TYPES, Event

__all__ = ["TABLE_SPECS", "row_builder"]

_PRICE = {"sales": "price", "listings": "price", "bids": "amount"}


def _columns(kind: str) -> tuple[str, ...]:
    return tuple(f.name for f in msgspec.structs.fields(RECORD_TYPES[kind]))


TABLE_SPECS: dict[str, TableSpec] = {
    kind: TableSpec(table=kind, columns=_columns(kind), price_column=_PRICE.get(kind)) for kind in RECORD_TYPES
}


def row_builder(kind: str) -> Callable[[Event], tuple[Any, ...]]:
    """A fast record -> tuple function for ``kind`` (attribute getter in column order).

    Examples
    --------
    >>> from datetime import datetime, timezone
    >>> from decimal import Decimal
    >>> from streams.records import Sale
    >>> s = Sale(event_id="e", ts=datetime(2021, 1, 1, tzinfo=timezone.utc), collection="c",
    ...          item_id="1", buyer="b", seller="s", price=Decimal("2"), currency="ETH")
    >>> dict(zip(TABLE_SPECS["sales"].columns, row_builder("sales")(s)))["price"]
    Decimal('2')
    """
    return attrgetter(*TABLE_SPECS[kind].columns)
