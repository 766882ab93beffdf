"""The one output-folder function: what it refuses, what it replaces, and that a user's files survive (byte for byte).
No model is loaded here; the CLI cases are in tests/test_hardening.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from laptop_deploy.errors import LaptopDeployError, OutputError
from laptop_deploy.outputs import (MARKER, as_path, delete_tree, foreign_entries, fresh_folder, prepare_output,
                                   read_marker, write_atomically)


def _write(files: dict[str, str]):
    def write(tmp: Path) -> None:
        for name, text in files.items():
            (tmp / name).write_text(text)
    return write


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every path under ``root`` → its bytes (files) or link target (symlinks), without following links."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            out[rel] = f"-> {os.readlink(path)}" if path.is_symlink() else (path.read_bytes() if path.is_file()
                                                                              else "dir")
    return out


def test_write_then_force_replace_keeps_only_the_new_content(tmp_path):
    out = tmp_path / "a" / "b"
    write_atomically(out, _write({"x.txt": "1", "y.txt": "2"}), kind="student")
    assert read_marker(out) == {"written_by": "laptop-deploy", "kind": "student", "entries": ["x.txt", "y.txt"]}
    with pytest.raises(OutputError, match="non-empty folder; pass --force"):
        write_atomically(out, _write({"z.txt": "3"}))
    write_atomically(out, _write({"z.txt": "3"}), force=True)
    assert sorted(os.listdir(out)) == [MARKER, "z.txt"]
    assert sorted(os.listdir(out.parent)) == ["b"]  # no temporary or old sibling left


def test_a_failing_write_leaves_the_old_folder_whole(tmp_path):
    out = tmp_path / "out"
    write_atomically(out, _write({"x.txt": "old"}))
    before = _snapshot(tmp_path)

    def fail(tmp: Path) -> None:
        (tmp / "x.txt").write_text("half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        write_atomically(out, fail, force=True)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["cwd", "ancestor", "root"])
def test_unsafe_folders_are_refused(tmp_path, monkeypatch, where):
    work = tmp_path / "project" / "sub"
    work.mkdir(parents=True)
    (work / "mine.txt").write_text("keep")
    monkeypatch.chdir(work)
    out = {"cwd": ".", "ancestor": "..", "root": "/"}[where]
    before = _snapshot(tmp_path)
    message = {"cwd": "is the working directory", "ancestor": "is an ancestor of the working directory",
               "root": "filesystem root"}[where]
    with pytest.raises(OutputError, match=message):
        write_atomically(out, _write({"x": "1"}), force=True)
    assert _snapshot(tmp_path) == before


def test_home_is_refused_when_it_is_not_an_ancestor(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="is the home directory"):
        prepare_output(tmp_path / "home", force=True)


def test_foreign_files_are_named_and_never_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (out / name).write_text(name)
    (out / "sub").mkdir()
    before = _snapshot(tmp_path)
    with pytest.raises(OutputError, match=r"did not write \(a.txt, b.txt, c.txt and 2 more\)"):
        write_atomically(out, _write({"x": "1"}), force=True)
    assert _snapshot(tmp_path) == before


def test_a_users_file_added_to_an_owned_folder_makes_it_foreign(tmp_path):
    out = tmp_path / "out"
    write_atomically(out, _write({"x.txt": "1"}))
    (out / "notes.md").write_text("mine")
    assert foreign_entries(out) == ["notes.md"]
    with pytest.raises(OutputError, match=r"\(notes.md\)"):
        write_atomically(out, _write({"x.txt": "2"}), force=True)
    assert (out / "notes.md").read_text() == "mine" and (out / "x.txt").read_text() == "1"


def test_a_forged_or_broken_marker_does_not_make_a_folder_ours(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.bin").write_bytes(b"\x00\x01")
    (out / MARKER).write_text("{not json")
    assert foreign_entries(out) == [MARKER, "data.bin"]
    (out / MARKER).write_text(json.dumps({"written_by": "someone", "entries": ["data.bin"]}))
    assert foreign_entries(out) == [MARKER, "data.bin"]


def test_symlinks_are_never_followed(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "file.txt").write_text("keep")
    out = tmp_path / "out"
    write_atomically(out, lambda tmp: (tmp / "link").symlink_to(precious))
    link_out = tmp_path / "link-out"
    link_out.symlink_to(out)
    with pytest.raises(OutputError, match="symbolic link"):
        prepare_output(link_out, force=True)
    write_atomically(out, _write({"y": "1"}), force=True)  # deletes the old folder holding a link to precious
    assert (precious / "file.txt").read_text() == "keep"
    delete_tree(link_out)  # a link is unlinked, its target untouched
    assert not link_out.exists() and out.is_dir() and (precious / "file.txt").read_text() == "keep"


def test_unwritable_parent_and_file_in_the_path_are_found_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="existing file"):
        prepare_output(tmp_path / "file")
    with pytest.raises(OutputError, match="cannot write there"):
        prepare_output(tmp_path / "file" / "out")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OutputError, match="cannot write there"):
            prepare_output(locked / "out")
    assert sorted(os.listdir(tmp_path)) == ["file"] + (["locked"] if os.geteuid() != 0 else [])


def test_fresh_folder_declares_what_a_run_will_add(tmp_path):
    out = tmp_path / "run"
    fresh_folder(out, kind="distill-run", entries=["log.jsonl", "checkpoints"])
    (out / "log.jsonl").write_text("{}")
    (out / "checkpoints").mkdir()
    assert foreign_entries(out) == []
    prepare_output(out, keep=True)  # continuing it (--resume) needs no force
    fresh_folder(out, force=True, kind="distill-run", entries=["log.jsonl"])
    assert os.listdir(out) == [MARKER]


def test_paths_accept_str_and_pathlike_only(tmp_path):
    assert as_path(str(tmp_path)) == tmp_path == as_path(tmp_path)
    with pytest.raises(LaptopDeployError, match="must be a str or os.PathLike, got int"):
        as_path(3)
    write_atomically(str(tmp_path / "s"), _write({"a": "1"}))
    assert (tmp_path / "s" / "a").read_text() == "1"


def test_a_killed_writers_hidden_folder_is_swept_by_the_next_write(tmp_path):
    """SIGKILL (the OOM killer) mid-write runs no cleanup: the next write to the same folder removes what that
    dead process left, and nothing else — not a live writer's folder, not another host's, not a user's."""
    import subprocess
    import sys

    out = tmp_path / "art"
    child = ("import os, signal, sys\nfrom pathlib import Path\nfrom laptop_deploy.outputs import write_atomically\n"
             "def write(tmp):\n    (tmp / 'model.onnx').write_bytes(b'x' * 1000)\n"
             "    os.kill(os.getpid(), signal.SIGKILL)\n"
             "write_atomically(Path(sys.argv[1]), write)\n")
    done = subprocess.run([sys.executable, "-c", child, str(out)], capture_output=True)
    assert done.returncode == -9
    [left] = [p for p in tmp_path.iterdir() if p.name.startswith(".art.new-")]
    assert (left / "model.onnx").stat().st_size == 1000 and not out.exists()
    dead, host = left.name.split("-")[1:3]
    kept = [tmp_path / f".art.new-{os.getpid()}-{host}-live", tmp_path / f".art.new-{dead}-other1-x",
            tmp_path / ".art.old-backup"]
    for folder in kept:
        folder.mkdir()
        (folder / "keep.txt").write_text("mine")
    write_atomically(out, _write({"a.txt": "new"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["art", *(f.name for f in kept)])
    assert (out / "a.txt").read_text() == "new" and all((f / "keep.txt").read_text() == "mine" for f in kept)
