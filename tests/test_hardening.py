"""Issue 14 through the CLI: --force never destroys a user's files (byte-identical afterwards), exit codes keep their
promise, nothing is silently ignored, the selection goes the right way, the Python API takes str | PathLike."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from laptop_deploy.cli.main import main
from laptop_deploy.errors import LaptopDeployError
from laptop_deploy.outputs import MARKER

IDENTITY = "down_blocks.1.resnets.1"  # made an exact identity: removing it changes nothing
VITAL = "up_blocks.3.attentions.2"  # the last unit, made to dominate the output: removing it is catastrophic


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on one thread (two spin against other processes on 2 cores); restored afterwards."""
    from deploy_fixtures import torch_threads

    with torch_threads(1):
        yield


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every path under ``root`` → bytes (files), link target (symlinks) or "dir", links never followed."""
    found: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            found[str(path.relative_to(root))] = (f"-> {os.readlink(path)}" if path.is_symlink() else
                                                  path.read_bytes() if path.is_file() else "dir")
    return found


def _user_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.tex").write_text("years of work\n")
    (folder / "data").mkdir()
    (folder / "data" / "results.csv").write_bytes(b"a,b\n1,2\n")


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory) -> Path:
    """random:tiny-sd15 saved as a bare U-Net folder (no text encoder, no scheduler), with IDENTITY's residual
    branch zeroed (output = input exactly) and VITAL's output projection multiplied by 1000."""
    from laptop_deploy.models.sources import resolve_model

    unet = resolve_model("random:tiny-sd15").unet
    modules = dict(unet.named_modules())
    with torch.no_grad():
        modules[IDENTITY].conv2.weight.zero_()
        modules[IDENTITY].conv2.bias.zero_()
        modules[VITAL].proj_out.weight.mul_(1000.0)
        modules[VITAL].proj_out.bias.mul_(1000.0)
    folder = tmp_path_factory.mktemp("bare") / "unet"
    unet.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------- output folders


@pytest.mark.parametrize("where", [".", "..", "HOME", "FOREIGN", "LINK", "FILE-IN-PATH"])
def test_force_never_touches_a_users_files(capsys, tmp_path, monkeypatch, where):
    project = tmp_path / "home" / "project"
    _user_files(project)
    (tmp_path / "home" / ".bashrc").write_text("alias x=y\n")
    monkeypatch.chdir(project)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    out, message = {
        ".": (".", "is the working directory"),
        "..": ("..", "is the home directory"),
        "HOME": (str(tmp_path / "home"), "is the home directory"),
        "FOREIGN": ("data", "holds files laptop-deploy did not write (results.csv)"),
        "LINK": ("link", "is a symbolic link"),
        "FILE-IN-PATH": ("thesis.tex/student", "cannot write there"),
    }[where]
    if where == "LINK":
        (project / "link").symlink_to(project / "data")
    before = _snapshot(tmp_path)
    code, stdout, err = _run(capsys, "prune", "--model", "random:tiny-sd15", "--ratio", "0.3", "--out", out,
                             "--force")
    assert code == 2 and stdout == "" and message in err and len(err.strip().splitlines()) == 1, err
    assert _snapshot(tmp_path) == before  # byte-identical: nothing deleted, nothing added


def test_force_replaces_only_its_own_student_atomically(capsys, tmp_path, student_dir):
    out = tmp_path / "students" / "s"
    shutil.copytree(student_dir, out)  # a student laptop-deploy wrote (marker included)
    assert json.loads((out / MARKER).read_text())["kind"] == "student"
    common = ["prune", "--model", "random:tiny-sd15", "--calib", "1", "--additivity-sets", "0", "--out", str(out)]
    code, _, err = _run(capsys, *common, "--remove", "mid_block.resnets.1")
    assert code == 2 and "pass --force" in err
    assert _run(capsys, *common, "--remove", "mid_block.resnets.1", "--force")[0] == 0
    assert json.loads((out / "laptop_deploy_student.json").read_text())["removed"] == ["mid_block.resnets.1"]
    assert sorted(os.listdir(out.parent)) == ["s"]  # no temporary or old copy left beside it
    (out / "my-notes.txt").write_text("mine")  # a user's file inside: the folder is no longer only ours
    code, _, err = _run(capsys, *common, "--remove", "mid_block.resnets.0", "--force")
    assert code == 2 and "(my-notes.txt)" in err and (out / "my-notes.txt").read_text() == "mine"


# ------------------------------------------------------------------ nothing silently ignored; the selection


def test_selection_removes_the_identity_unit_keeps_the_vital_one_and_states_the_schedule(capsys, tmp_path,
                                                                                         unet_folder):
    out = tmp_path / "s"
    code, stdout, err = _run(capsys, "prune", "--model", str(unet_folder), "--ratio", "0.3", "--calib", "2",
                             "--additivity-sets", "0", "--out", str(out), "--json")
    assert code == 0, err
    plan = json.loads((out / "pruning_plan.json").read_text())
    scores = {row["name"]: row["score"] for row in plan["layers"] if row["score"] is not None}
    ranked = sorted(scores.values())
    assert scores[IDENTITY] == 0.0 == ranked[0]  # exactly nothing changes without it: the first to go
    assert scores[VITAL] >= ranked[-2] and scores[VITAL] > 5 * ranked[len(ranked) // 2]  # among the top two
    assert IDENTITY in plan["removed"] and VITAL not in plan["removed"]
    # a bare U-Net folder has no scheduler: said on stderr and recorded in the plan, not silently assumed
    assert "warning: the model has no scheduler" in err
    assert any("no scheduler" in note for note in plan["notes"])
    assert "no scheduler" in plan["calibration"]["noise_schedule"]


def test_prompts_without_a_text_encoder_are_refused_like_images_without_a_vae(capsys, tmp_path, unet_folder):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    for flag, value, message in (("--prompts", prompts, "--prompts needs a text encoder"),
                                 ("--images", tmp_path, "--images needs a VAE")):
        code, stdout, err = _run(capsys, "prune", "--model", str(unet_folder), "--ratio", "0.3", flag, str(value),
                                 "--out", str(tmp_path / "s"))
        assert code == 2 and message in err and err.strip().splitlines()[-1].startswith("laptop-deploy: error:")
        assert not (tmp_path / "s").exists()


def test_additivity_verdict_per_set():
    from laptop_deploy.prune.additivity import AdditivityReport, SetMeasurement

    report = AdditivityReport([SetMeasurement("chosen", ("a", "b"), 0.3, joint=2.1, summed=1.0),
                               SetMeasurement("random-0", ("c",), 0.3, joint=1.0, summed=1.0),
                               SetMeasurement("random-1", ("d",), 0.3, joint=0.49, summed=1.0)])
    data = report.as_dict()
    assert data["chosen_additive"] is False and data["chosen_verdict"].startswith("not additive for this set")
    assert [s["additive"] for s in data["sets"]] == [False, True, False]


# ----------------------------------------------------------------------------------------- distillation


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    from laptop_deploy.models.sources import resolve_model
    from laptop_deploy.models.student import make_student, save_student

    teacher = resolve_model("random:tiny-sd15")
    out = tmp_path_factory.mktemp("student") / "s"
    save_student(make_student(teacher.unet, ["mid_block.resnets.0", "up_blocks.0.resnets.2"]), out,
                 teacher=teacher.describe())
    return out


def test_a_non_finite_loss_exits_1_and_keeps_the_last_good_checkpoint(capsys, tmp_path, student_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "run"
    code, stdout, err = _run(capsys, "distill", "--teacher", "random:tiny-sd15", "--student", str(student_dir),
                             "--prompts", str(prompts), "--steps", "4", "--batch-size", "1", "--lr", "1e30",
                             "--ema-decay", "0", "--checkpoint-every", "1", "--latent-size", "8", "8",
                             "--eval-samples", "1", "--out", str(out), "--json")
    summary = json.loads(stdout)
    assert code == 1 and summary["exit_code"] == 1, err
    stopped = summary["stopped"]
    assert stopped["step"] >= 2 and stopped["checkpoint_step"] == stopped["step"] - 1
    assert f"last good checkpoint (step {stopped['checkpoint_step']})" in err and len(err.strip().splitlines()) == 1
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == stopped["checkpoint_step"]
    assert json.loads((out / "distill_summary.json").read_text())["stopped"] == stopped
    assert not (out / "laptop_deploy_student.json").exists()  # no student from a failed run


def test_distill_checks_the_student_before_touching_data(capsys, tmp_path):
    from PIL import Image

    from laptop_deploy.models.sources import resolve_model
    from laptop_deploy.models.student import save_student

    sdxl = resolve_model("random:tiny-sdxl")
    save_student(sdxl.unet, tmp_path / "sdxl", teacher=sdxl.describe())
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (16, 16), "red").save(data / "0.png")
    (data / "0.txt").write_text("red")
    code, _, err = _run(capsys, "distill", "--teacher", "random:tiny-sd15", "--student", str(tmp_path / "sdxl"),
                        "--data", str(data), "--steps", "1", "--cache-dir", str(tmp_path / "cache"),
                        "--out", str(tmp_path / "run"))
    assert code == 2 and "does not match teacher" in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_distill_force_refuses_a_users_folder(capsys, tmp_path, student_dir):
    _user_files(tmp_path / "mine")
    before = _snapshot(tmp_path / "mine")
    code, _, err = _run(capsys, "distill", "--teacher", "random:tiny-sd15", "--student", str(student_dir),
                        "--prompts", str(tmp_path / "mine" / "thesis.tex"), "--steps", "1",
                        "--out", str(tmp_path / "mine"), "--force")
    assert code == 2 and "did not write (data/, thesis.tex)" in err
    assert _snapshot(tmp_path / "mine") == before


# ------------------------------------------------------------------------------------ ORT providers


def test_a_provider_asked_for_but_not_active_is_exit_2_unless_allowed(capsys, tiny_onnx_fp32, monkeypatch):
    import onnxruntime as ort

    _, folder = tiny_onnx_fp32
    real = ort.get_available_providers()
    # what a CUDA build without its libraries reports: CUDA listed, yet the session comes up on the CPU only
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    argv = ["bench", str(folder), "--provider", "cuda", "--iterations", "1", "--warmup", "0", "--json"]
    code, stdout, err = _run(capsys, *argv)
    assert code == 2 and stdout == "" and "CUDAExecutionProvider was asked for but is not active" in err
    code, stdout, err = _run(capsys, *argv, "--allow-fallback")
    assert code == 0 and json.loads(stdout)["providers"] == ["CPUExecutionProvider"]


def test_verify_json_names_the_providers_used(capsys, tiny_onnx_fp32):
    _, folder = tiny_onnx_fp32
    code, stdout, err = _run(capsys, "verify", str(folder), "--model", "random:tiny-sd15", "--steps", "2",
                             "--skip-digest", "--json")
    assert code == 0, err
    assert json.loads(stdout)["providers"] == ["CPUExecutionProvider"]


# ------------------------------------------------------------------------------------------ Python API


def test_python_api_takes_str_and_pathlike_and_raises_its_own_errors(student_dir):
    from laptop_deploy.models.sources import resolve_model
    from laptop_deploy.models.student import load_student, read_student_meta

    by_str, by_path = load_student(str(student_dir)), load_student(student_dir)
    assert sum(p.numel() for p in by_str.parameters()) == sum(p.numel() for p in by_path.parameters())
    assert resolve_model(student_dir).kind == "student" and read_student_meta(str(student_dir))["removed"]
    for call in (lambda: load_student(42), lambda: resolve_model(3.5), lambda: load_student("no/such/folder")):
        with pytest.raises(LaptopDeployError):
            call()


# -------------------------------------------------------------------------------------------- warnings


def test_only_known_noise_is_muted_and_quiet_mutes_all():
    import logging
    import warnings

    from laptop_deploy.cli.noise import library_noise

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger("transformers.utils.import_utils")
    handler = Keep()
    logger.addHandler(handler)
    known = "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`"
    try:
        with library_noise(), warnings.catch_warnings(record=True) as caught:
            logger.warning(known)
            logger.warning("a message nobody listed")
            warnings.warn_explicit("old API", FutureWarning, "x.py", 1, module="diffusers.models")
            warnings.warn_explicit("tracer: output depends on a Python value", UserWarning, "y.py", 2,
                                   module="torch.jit")
        assert seen == ["a message nobody listed"]
        assert [str(w.message) for w in caught] == ["tracer: output depends on a Python value"]
        with library_noise(quiet=True), warnings.catch_warnings(record=True) as caught:
            logger.warning("a message nobody listed")
            warnings.warn_explicit("tracer", UserWarning, "y.py", 3, module="torch.jit")
        assert seen == ["a message nobody listed"] and caught == []
        assert logging.root.manager.disable == logging.NOTSET and not logger.filters  # all restored
        logger.warning(known)  # outside the CLI nothing is filtered
        assert seen[-1] == known
    finally:
        logger.removeHandler(handler)
