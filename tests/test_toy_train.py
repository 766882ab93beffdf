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
