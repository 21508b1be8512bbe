"""<stem>.parts/: a run's results stored as they arrive, so that an interrupted run resumes where
it stopped and no member is restored twice."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

import fsspec

from pipelines.shards import atomic_write
from serving.archive.members import ArchiveError


class Parts:
    """`files/<ordinal>` holds a restored member's bytes, `stage1/<ordinal>.png` its stage-1 image
    when the contact sheet shows it, `records/*.jsonl` one line per finished member (written after
    its files, so a record always has its file), and `run.json` the fingerprint of what the parts
    belong to."""

    def __init__(self, url: str):
        self.fs, self.root = fsspec.core.url_to_fs(url)

    def claim(self, fingerprint: dict) -> None:
        """Start, or resume parts with the same fingerprint; parts of another input content,
        model or output option are refused."""
        run_file = f"{self.root}/run.json"
        if self.fs.exists(run_file):
            earlier = json.loads(self.fs.cat_file(run_file))
            if earlier != fingerprint:
                changed = sorted(k for k in fingerprint.keys() | earlier.keys() if earlier.get(k) != fingerprint.get(k))
                raise ArchiveError(
                    f"{self.root} holds parts of a run with another {', '.join(changed)}; "
                    "rerun with --overwrite to start afresh"
                )
            return
        for folder in ("files", "records", "stage1"):
            self.fs.makedirs(f"{self.root}/{folder}", exist_ok=True)
        with atomic_write(self.fs, run_file) as f:
            f.write(json.dumps(fingerprint, indent=1).encode())

    def records(self) -> dict[int, dict]:
        """The latest record of each member (a failed or skipped member may have been retried)."""
        latest: dict[int, dict] = {}
        for path in sorted(self.fs.find(f"{self.root}/records")):
            if not path.endswith(".jsonl"):
                continue
            for line in self.fs.cat_file(path).decode().splitlines():
                record = json.loads(line)
                if record["ordinal"] not in latest or latest[record["ordinal"]]["finished_at"] <= record["finished_at"]:
                    latest[record["ordinal"]] = record
        return latest

    def save(self, rows: list[dict], stamp: dict) -> None:
        """Store results (rows with `data` and `stage1` bytes or None): the files, then their
        records, each with `stamp` (run id, limits) and the size of its output."""
        finished_at = datetime.now(timezone.utc).isoformat()
        records = []
        for row in rows:
            data, stage1 = row.pop("data", None), row.pop("stage1", None)
            for payload, path in ((data, self.file(row["ordinal"])), (stage1, self.stage1_file(row["ordinal"]))):
                if payload is not None:
                    with atomic_write(self.fs, path) as f:
                        f.write(payload)
            record = row | stamp | dict(bytes=None if data is None else len(data), finished_at=finished_at)
            records.append(json.dumps(record))
        with atomic_write(self.fs, f"{self.root}/records/{uuid.uuid4().hex}.jsonl") as f:
            f.write("\n".join(records).encode())

    def file(self, ordinal: int) -> str:
        return f"{self.root}/files/{ordinal}"

    def stage1_file(self, ordinal: int) -> str:
        return f"{self.root}/stage1/{ordinal}.png"

    def remove(self) -> None:
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)
