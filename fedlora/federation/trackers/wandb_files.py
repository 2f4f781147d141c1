"""What a W&B run's local files hold: the rounds a resumed run need not log again.

W&B writes each run attempt's records to ``<dir>/wandb/*-<time>-<id>/run-<id>.wandb``
(its transaction log, which ``wandb sync`` uploads), buffered in memory and
written every ``x_transaction_log_flush_interval`` seconds: a run killed
between two writes loses its last rounds from the file, though ``wandb.log``
had returned. So a resumed run reads the steps these files hold, not what
it told W&B. wandb reads these files in Go only (0.31 has no Python reader),
so the framing is read here: LevelDB's log format, which W&B writes (32 KiB
blocks; each chunk a 7-byte header, CRC-32 of type and data, length and
type, then its data), each record W&B's own protobuf. A chunk cut short or
failing its CRC ends the reading: it is where a kill stopped the writer.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7  # the file's (":W&B", magic 0xBEE1, version 0), and each chunk's
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    """The records of one .wandb file, in order."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    if data[:4] != b":W&B" or struct.unpack("<HB", data[4:HEADER]) != (0xBEE1, 0):
        return
    pending, offset = b"", HEADER
    while offset + HEADER <= len(data):
        left = BLOCK - offset % BLOCK
        crc, length, kind = struct.unpack("<IHB", data[offset:offset + HEADER])
        if left < HEADER or (kind == 0 and length == 0):  # padding to the block's end
            offset += left
            continue
        chunk = data[offset + HEADER:offset + HEADER + length]
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != crc:
            return
        pending += chunk
        if kind in (FULL, LAST):
            record = Record()
            record.ParseFromString(pending)
            yield record
            pending = b""
        offset += HEADER + length


def run_files(directory: Path, run_id: str) -> list[Path]:
    """Every attempt's .wandb file of ``run_id`` under ``directory`` (W&B's
    ``dir``), oldest first (their folders are named by start time)."""
    return sorted((directory / "wandb").glob(f"*-{run_id}/run-{run_id}.wandb"),
                  key=lambda path: path.parent.name.split("-")[-2])


def last_step(directory: Path, run_id: str) -> int:
    """The last history step (round) the run's files hold; 0 if none."""
    return max((record.history.step.num for path in run_files(directory, run_id)
                for record in records(path) if record.HasField("history")), default=0)
