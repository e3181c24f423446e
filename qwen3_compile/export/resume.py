"""Resumable large exports: a journal of finished weight groups in a fixed partial folder.

A streamed export builds in `.<name>.partial` next to the output. After each weight group (embeddings,
each decoder layer, final norm + lm_head) the data file is synced and the journal records how many bytes
it then holds. An interrupted export leaves the folder; `--resume` reopens it, checks the journal was
made from the same inputs and options, cuts the data file back to the last recorded group and continues
after it (finished groups are replayed: their tensor descriptions rebuilt, no weights read or written).
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
from qwen3_compile.storage.artifact_dir import replace_dir

JOURNAL_FILE = "export-journal.json"
JOURNAL_VERSION = 1


def partial_dir(output: Path) -> Path:
    return output.parent / f".{output.name}.partial"


def fingerprint(record: dict[str, Any]) -> str:
    """What must not change between an interrupted export and its resumption."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class ExportJournal:
    folder: Path
    fingerprint: str
    offsets: list[int] = field(default_factory=list)  # data-file bytes after each finished group

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
        self.offsets.append(offset)
        tmp = self.path.with_suffix(".tmp")
        data = {"version": JOURNAL_VERSION, "fingerprint": self.fingerprint, "offsets": self.offsets}
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
            version, recorded = data["version"], data["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
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
        return cls(folder, fingerprint, offsets)


@contextmanager
def resumable_output_dir(
    output: Path, force: bool, resume: bool, fingerprint: str, data_file: str
) -> Iterator[ExportJournal]:
    """Build in the partial folder (the journal's `folder`), rename it to `output` when complete. On
    failure the folder is kept if any group finished, so `--resume` can continue."""
    partial = partial_dir(output)
    journal = ExportJournal.load(partial, fingerprint, data_file) if resume and partial.exists() else None
    if journal is None:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        journal = ExportJournal(partial, fingerprint)
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
