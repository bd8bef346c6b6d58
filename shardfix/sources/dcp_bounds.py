"""Cost bounds for DCP metadata and records: what a crafted ``.metadata`` or record may make shardfix do.

* **Elements, not bytes.** A pickle can reference one memoised list from every tensor, so a
  23 KB ``.metadata`` can describe millions of chunks. A genuine pickle spends well over
  :data:`BYTES_PER_CHUNK` bytes on each chunk (its offsets, sizes and storage entry), so the
  chunks the metadata lists are counted (``len`` only, before anything iterates them) and more
  than ``bytes / BYTES_PER_CHUNK + MIN_CHUNKS`` is refused.
* **Peeking, not materialising.** Indexing checks a record smaller than its box (a stride-0
  save, or a damaged record) by decoding it as it is stored -- a stride-0 record stays its few
  bytes -- and never decompresses a zstd record to learn its size (a compressed record is
  checked when it is read, and its decompression is bounded by its box).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shardfix.errors import BadInputError

BYTES_PER_CHUNK = 16
MIN_CHUNKS = 4096


def check_chunk_count(md_files: list[Path], metas: list[Any]) -> None:
    """Refuse metadata that lists more chunks than its bytes can genuinely describe.

    Raises:
        BadInputError: naming the metadata and both counts.
    """
    for path, md in zip(md_files, metas, strict=True):
        try:
            items = md.state_dict_metadata.values()
            count = sum(len(m.chunks) for m in items if hasattr(m, "chunks"))
        except (AttributeError, TypeError):
            continue  # not metadata; the index builder says so
        size = path.stat().st_size
        limit = size // BYTES_PER_CHUNK + MIN_CHUNKS
        if count > limit:
            raise BadInputError(
                f"{path}: lists {count:,} chunk boxes in {size:,} bytes (at most {limit:,} fit genuinely); the "
                "metadata reuses the same entries over and over, so it is crafted or corrupt -- not read further"
            )
