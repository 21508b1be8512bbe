"""Archive restoration: every image of a tar, zip or folder restored into one of the same kind.

    members   listing, screening and reading members (standard library and fsspec only)
    parts     the work folder of a run: results as they arrive, resuming
    outputs   the output archive or folder, the manifest, the contact sheet
    job       ArchiveConfig and the Ray job (`python -m serving.archive`, see its docstring)

The names below are loaded on first use, so importing `serving.archive.members` does not pull in
Ray or torch through this package.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "ArchiveConfig": "job",
    "restore_archive": "job",
    "main": "job",
    "ArchiveError": "members",
    "Member": "members",
    "Screening": "members",
    "archive_kind": "members",
    "list_members": "members",
    "read_members": "members",
    "safe_path": "members",
    "Parts": "parts",
    "write_output": "outputs",
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
