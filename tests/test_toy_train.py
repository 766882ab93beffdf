"""The toy teacher's trainer writes its folder through outputs.py: refused into a user's folder before any work,
each checkpoint replaced atomically and marked as ours."""

import json

import pytest

from deploy_fixtures import torch_threads
from laptop_deploy.outputs import MARKER
from laptop_deploy.toy.train import main


@pytest.fixture(autouse=True)
def _restore_threads():
    with torch_threads(1):  # the trainer sets torch's thread count (--threads, default 1)
        yield


def test_trainer_refuses_a_users_folder_and_marks_its_own(tmp_path, capsys):
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("keep me\n")
    with pytest.raises(SystemExit) as stop:
        main(["--out", str(users), "--steps", "0", "--samples", "4"])
    assert stop.value.code == 2 and "notes.txt" in capsys.readouterr().err
    assert [p.name for p in users.iterdir()] == ["notes.txt"]

    out = tmp_path / "teacher"
    main(["--out", str(out), "--steps", "0", "--samples", "4"])
    assert json.loads((out / MARKER).read_text())["kind"] == "toy-teacher"
    assert (out / "unet" / "config.json").is_file() and (out / "model_index.json").is_file()
    with pytest.raises(SystemExit):  # an earlier teacher of ours is replaced only with --force
        main(["--out", str(out), "--steps", "0", "--samples", "4"])
    main(["--out", str(out), "--steps", "0", "--samples", "4", "--force"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "teacher", "teacher.log.jsonl"]


def test_written_folders_and_files_have_the_umasks_modes_not_the_temp_files(tmp_path):
    """write_atomically / replace_file build in mkdtemp / mkstemp (0700 / 0600): the result must read like anything
    else the user writes (0777 / 0666 minus the umask), or the artifact is private to whoever exported it."""
    import os

    from laptop_deploy.outputs import replace_file, write_atomically

    mask = os.umask(0o022)
    try:
        folder = write_atomically(tmp_path / "art", lambda tmp: (tmp / "a.txt").write_text("x"), kind="test")
        file = replace_file(tmp_path / "img.png", lambda tmp: tmp.write_bytes(b"png"))
    finally:
        os.umask(mask)
    assert folder.stat().st_mode & 0o777 == 0o755 and file.stat().st_mode & 0o777 == 0o644
