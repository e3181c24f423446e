"""Resumable large exports: a journal of finished weight groups in a fixed partial folder.

A streamed export builds in `.<name>.partial` next to the output. After each weight group (embeddings,
each decoder layer, final norm + lm_head) the data file is synced and the journal records how many bytes
it then holds and the sha256 of the group's bytes. An interrupted export leaves the folder; `--resume`
reopens it, checks the journal was made from the same inputs and options, re-hashes every finished group
(bytes changed between runs are written again, from the first changed group on), cuts the data file back
to the last good group and continues after it (finished groups are replayed: their tensor descriptions
rebuilt, no weights read or written).
Without `--resume` a stale partial folder is discarded and the export starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3_compile.errors import BadInputError
from qwen3_compile.storage.artifact_dir import held, remove_stale_partials, replace_dir

JOURNAL_FILE = "export-journal.json"
JOURNAL_VERSION = 2  # 2: a sha256 per group
HASH_CHUNK = 16 * 2**20


def partial_dir(output: Path) -> Path:
    return output.parent / f".{output.name}.partial"


def fingerprint(record: dict[str, Any]) -> str:
    """What must not change between an interrupted export and its resumption."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class ExportJournal:
    folder: Path
    fingerprint: str
    data_file: str
    offsets: list[int] = field(default_factory=list)  # data-file bytes after each finished group
    hashes: list[str] = field(default_factory=list)  # sha256 of each group's bytes

    @property
    def path(self) -> Path:
        return self.folder / JOURNAL_FILE

    @property
    def groups_done(self) -> int:
        return len(self.offsets)

    @property
    def resume_offset(self) -> int:
        return self.offsets[-1] if self.offsets else 0

    def layers_done(self, num_layers: int) -> int:
        """Decoder layers among the finished groups (group 0 is the embeddings, the last the final norm
        and lm_head)."""
        return min(max(self.groups_done - 1, 0), num_layers)

    def record(self, offset: int) -> None:
        """Group `groups_done` is written and synced: say so, atomically."""
        self.hashes.append(_range_sha256(self.folder / self.data_file, self.resume_offset, offset))
        self.offsets.append(offset)
        tmp = self.path.with_suffix(".tmp")
        data = {
            "version": JOURNAL_VERSION,
            "fingerprint": self.fingerprint,
            "offsets": self.offsets,
            "hashes": self.hashes,
        }
        with tmp.open("w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)

    def check_replayed(self, group: int, offset: int) -> None:
        if self.offsets[group] != offset:
            raise BadInputError(
                f"the partial export does not match this export: after weight group {group} it holds "
                f"{self.offsets[group]} bytes, this export puts {offset} there.",
                file=self.path,
                fix="drop --resume to start over.",
            )

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    @classmethod
    def load(cls, folder: Path, fingerprint: str, data_file: str) -> ExportJournal | None:
        """The journal in `folder` if it belongs to this export; None when there is none to resume."""
        path = folder / JOURNAL_FILE
        try:
            data = json.loads(path.read_text())
            offsets = [int(o) for o in data["offsets"]]
            hashes = [str(h) for h in data.get("hashes", [])]
            version, recorded = data["version"], data["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # not a journal we wrote: start over
        if version != JOURNAL_VERSION or recorded != fingerprint:
            raise BadInputError(
                "the partial export here was made from other inputs or options (model, checkpoint "
                "layout, --dtype, --opset, --target or qwen3-compile version differ).",
                file=folder,
                fix="rerun with exactly the interrupted command's MODEL and options, or drop --resume to "
                "start over.",
            )
        data_path = folder / data_file
        have = data_path.stat().st_size if data_path.exists() else 0
        if offsets and have < offsets[-1]:
            raise BadInputError(
                f"the partial export's data file has {have} bytes, its journal says {offsets[-1]}.",
                file=data_path,
                fix="drop --resume to start over.",
            )
        if len(hashes) != len(offsets) or offsets != sorted(offsets) or (offsets and offsets[0] < 0):
            return None
        good = 0  # groups whose bytes are still what was written
        for start, end, digest in zip([0, *offsets[:-1]], offsets, hashes, strict=True):
            if _range_sha256(data_path, start, end) != digest:
                break
            good += 1
        return cls(folder, fingerprint, data_file, offsets[:good], hashes[:good])


def _range_sha256(path: Path, start: int, end: int) -> str:
    """sha256 of bytes [start, end) of `path`, read back after they were synced."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        while start < end:
            chunk = os.pread(fd, min(HASH_CHUNK, end - start), start)
            if not chunk:
                break  # shorter than the journal says: the digest will not match
            digest.update(chunk)
            start += len(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


@contextmanager
def resumable_output_dir(
    output: Path, force: bool, resume: bool, fingerprint: str, data_file: str
) -> Iterator[ExportJournal]:
    """Build in the partial folder (the journal's `folder`), rename it to `output` when complete. On
    failure the folder is kept if any group finished, so `--resume` can continue. The run holds the
    folder (an flock), so a second run of the same output neither resumes nor discards it meanwhile."""
    partial = partial_dir(output)
    remove_stale_partials(output)
    partial.mkdir(parents=True, exist_ok=True)
    with held(partial):
        journal = ExportJournal.load(partial, fingerprint, data_file) if resume else None
        if journal is None:
            for entry in partial.iterdir():  # start over (the folder itself stays: we hold it)
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            journal = ExportJournal(partial, fingerprint, data_file)
        try:
            yield journal
        except BaseException:
            if not journal.groups_done:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        journal.remove()  # normally done by the stage before it hashes the folder into its manifest
        if output.exists() and not force:  # checked before the work started; someone created it meanwhile
            raise BadInputError(
                "the output directory appeared while exporting.",
                file=output,
                field="--output",
                fix=f"move it away; the finished export is in {partial}.",
            )
        replace_dir(partial, output)
