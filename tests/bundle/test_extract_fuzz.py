"""Property: whatever an archive holds (member kinds, names, sizes, link targets, a manifest or none, a cut
or a flipped byte), safe_extract either extracts regular files and folders the manifest lists, or raises
BundleError and leaves the sandbox empty; it never writes outside the destination and finishes fast."""

from __future__ import annotations

import gzip
import hashlib
import stat
import tempfile
from datetime import timedelta
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qwen3_compile.bundle.device.bundle_files import DEFAULT_LIMITS, BundleError, Limits, safe_extract

from .hostile import KINDS, Entry, records, tar_bytes, tree

PARTS = ["a", "b", "A", "model", "manifest.json", "..", ".", "", "c:", "x\\y", "\x00", "\u00fc", "\udcff"]
GOOD = ["a", "b", "A", "model", "model/a", "model/b", "model/A", "up", "up/a", "manifest.json"]
names = st.one_of(  # mostly names a bundle could hold, so that the checks after the name's are reached too
    st.sampled_from(GOOD),
    st.sampled_from(GOOD),
    st.lists(st.sampled_from(PARTS), min_size=1, max_size=4).map("/".join),
    st.sampled_from(["/etc/passwd", "/tmp", "../outside/secret.txt", "up/../outside/secret.txt", "."]),
)
entries = st.builds(
    Entry,
    name=names,
    kind=st.sampled_from(["file", "file", "file", "dir", *sorted(KINDS)]),
    data=st.binary(max_size=16),
    link=names,
    size=st.none() | st.none() | st.none() | st.integers(0, 1 << 40),  # declared beyond the data: the end
)
bad_records = st.one_of(
    st.fixed_dictionaries(
        {
            "sha256": st.sampled_from(["0" * 64, "Z" * 64, 7]),
            "bytes": st.integers(-1, 1 << 42) | st.booleans(),
        }
    ),
    st.just("junk"),
)
SMALL = Limits(total_bytes=1 << 12, file_bytes=1 << 10, files=8)


@st.composite
def archives(draw) -> tuple[bytes, Limits]:
    members = draw(st.lists(entries, max_size=8))
    if draw(st.booleans()):  # a well-formed bundle first, then maybe hostile members
        files = draw(st.lists(st.sampled_from(["a", "b", "model/a", "model/b", "up/a"]), unique=True))
        folders = sorted({n.split("/")[0] for n in files if "/" in n})
        body = [Entry(n, data=n.encode()) for n in files]
        members = [*(Entry(d, "dir") for d in folders), *body, *members[: draw(st.integers(0, 2))]]
    manifest = None
    if draw(st.integers(0, 3)):  # mostly a manifest first: of the members' real contents, plus anything
        files = {e.name: e.data for e in members if e.kind == "file" and e.size is None}
        listed = records(files) if draw(st.integers(0, 3)) else {}
        manifest = {"files": listed | draw(st.dictionaries(names, bad_records, max_size=2) | st.just({}))}
    raw = gzip.compress(tar_bytes(members, manifest), compresslevel=1)
    if not draw(st.integers(0, 3)):  # a cut or a flipped byte
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] if draw(st.booleans()) else raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :]
    return raw, draw(st.sampled_from([DEFAULT_LIMITS, SMALL]))


@settings(
    max_examples=400,
    deadline=timedelta(seconds=2),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(archives())
def test_any_archive_is_extracted_safely_or_refused(case):
    raw, limits = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "sandbox").mkdir()
        (root / "outside").mkdir()
        (root / "outside" / "secret.txt").write_text("secret\n")
        archive = root / "bundle.tar.gz"
        archive.write_bytes(raw)
        outside = tree(root / "outside")
        dest = root / "sandbox" / "out"
        try:
            names = safe_extract(archive, dest, limits)
        except BundleError as err:
            event(f"refused: {err.problem[:60]}")  # --hypothesis-show-statistics
            assert err.exit_code in (1, 2) and str(err)
            assert tree(root / "sandbox") == {}  # nothing left behind
        else:
            event(f"extracted {len(names)} files")
            found = tree(dest)  # regular files (no other name) and folders only: what the manifest lists
            assert {n for n, (mode, *_) in found.items() if stat.S_ISREG(mode)} == set(names)
            assert all(stat.S_ISREG(mode) or stat.S_ISDIR(mode) for mode, *_ in found.values())
            assert all(nlink == 1 for mode, _, nlink, _ in found.values() if stat.S_ISREG(mode))
            assert tree(root / "sandbox").keys() == {"out"} | {f"out/{n}" for n in found}
        assert tree(root / "outside") == outside and sorted(p.name for p in root.iterdir()) == [
            "bundle.tar.gz",
            "outside",
            "sandbox",
        ]
        assert hashlib.sha256(archive.read_bytes()).digest() == hashlib.sha256(raw).digest()
