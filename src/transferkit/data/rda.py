"""Read objects from an R package's lazy-load database without R, on top of the ``rdata`` package.

An installed R package keeps its data sets in ``<pkg>/data/Rdata.rdb`` + ``Rdata.rdx``:

- ``Rdata.rdx`` is a gzip-compressed serialized R list; after conversion its ``variables`` entry
  maps each object name to ``(offset, length)`` in the ``.rdb`` file.
- At that offset the ``.rdb`` holds one compressed serialized object: 4 bytes big-endian
  uncompressed length, then (R >= 2.10) one byte naming the compression: ``Z`` = raw LZMA2 stream,
  ``2`` = bzip2, ``1`` = zlib, ``0`` = stored; any other byte means the older layout, zlib data
  starting right after the 4 length bytes.
- The decompressed bytes are an RDS-style serialization which ``rdata`` parses and converts
  (data frames become pandas DataFrames, factors become Categoricals).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import warnings
import zlib
from pathlib import Path
from typing import Any

from ..errors import DataError


def _convert(raw: bytes) -> Any:
    import rdata

    with warnings.catch_warnings():
        # e.g. 'Missing constructor for R class "tbl_df"': rdata falls back to data.frame, which is fine
        warnings.simplefilter("ignore")
        return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))


def _index(rdx: Path) -> dict[str, tuple[int, int]]:
    raw = rdx.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    else:  # R writes the index zlib-compressed behind a 4-byte length in some versions
        raw = zlib.decompress(raw[4:])
    index = _convert(raw)
    return {str(k): (int(v[0]), int(v[1])) for k, v in index["variables"].items()}


def _decompress(blob: bytes) -> bytes:
    size = int.from_bytes(blob[:4], "big")
    kind = blob[4:5]
    if kind == b"Z":
        out = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}]).decompress(blob[5:])
    elif kind == b"2":
        out = bz2.decompress(blob[5:])
    elif kind == b"1":
        out = zlib.decompress(blob[5:])
    elif kind == b"0":
        out = blob[5:]
    else:
        out = zlib.decompress(blob[4:])
    if len(out) != size:
        raise DataError(f"corrupt R lazy-load entry: expected {size} bytes, got {len(out)}")
    return out


def list_objects(rdb: str | Path, rdx: str | Path | None = None) -> list[str]:
    """Names of the objects in a lazy-load database (``rdx`` defaults to the ``.rdx`` beside it)."""
    rdb = Path(rdb)
    return sorted(_index(Path(rdx) if rdx else rdb.with_suffix(".rdx")))


def read_lazyload(rdb: str | Path, names: list[str], rdx: str | Path | None = None) -> dict[str, Any]:
    """Read objects ``names`` from ``<pkg>/data/Rdata.rdb`` (+ ``.rdx``) as Python/pandas objects."""
    rdb = Path(rdb)
    rdx = Path(rdx) if rdx else rdb.with_suffix(".rdx")
    try:
        index = _index(rdx)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read R lazy-load index {rdx}: {type(exc).__name__}") from None
    missing = [n for n in names if n not in index]
    if missing:
        raise DataError(f"{rdb} has no object {missing[0]!r}; it has: {', '.join(sorted(index)[:20])}, …")
    out = {}
    with open(rdb, "rb") as f:
        for name in names:
            offset, length = index[name]
            f.seek(offset)
            blob = f.read(length)
            try:
                out[name] = _convert(_decompress(blob))
            except DataError:
                raise
            except Exception as exc:
                raise DataError(f"cannot read {name!r} from {rdb}: {type(exc).__name__}") from None
    return out
