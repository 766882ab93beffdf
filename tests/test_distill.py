"""Distillation: the loss, feature taps through wrappers, training that learns, exact resume after SIGKILL, the CLI."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from laptop_deploy.cli.main import main
from laptop_deploy.distill.options import DistillOptions
from laptop_deploy.distill.train import distill, prepare_run
from laptop_deploy.distill.loss import FeatureTaps, feature_terms, unwrap
from laptop_deploy.distill.state import LOG_FILE, SUMMARY_FILE
from laptop_deploy.distill.data import prompt_data
from laptop_deploy.models.sources import ModelSource, resolve_model
from laptop_deploy.models.student import load_student, make_student, save_student
from laptop_deploy.models.weights import read_safetensors

# A valid LAPTOP-Diff removal set on random:tiny-sd15 (`prune --ratio 0.5`, seed 0): 51.5% of the parameters.
REMOVED = ["down_blocks.2.resnets.1", "down_blocks.2.attentions.1", "down_blocks.3.resnets.0",
           "down_blocks.3.resnets.1", "mid_block.resnets.0", "mid_block.resnets.1", "mid_block.attentions.0",
           "up_blocks.0.resnets.0", "up_blocks.0.resnets.1", "up_blocks.0.resnets.2", "up_blocks.1.attentions.0",
           "up_blocks.1.attentions.1"]
PROMPTS = ["a red circle at the top left", "a blue square in the middle", "a green triangle at the bottom",
           "a yellow star on a black background"]


def _pair(teacher: ModelSource, removed: list[str] = REMOVED) -> ModelSource:
    unet = make_student(copy.deepcopy(teacher.unet), removed)
    return ModelSource("student", "student", unet, teacher.family, removed=list(removed))


def _run(tmp_path: Path, teacher: ModelSource | None = None, removed: list[str] = REMOVED, **overrides):
    teacher = teacher or resolve_model("random:tiny-sd15")
    options = DistillOptions(**{"steps": 4, "batch_size": 2, "lr": 1e-3, "ema_decay": 0.0,
                                "checkpoint_every": 1000, **overrides})
    data = prompt_data(teacher, PROMPTS, latent_size=(16, 16))
    return prepare_run(teacher, _pair(teacher, removed), data, options, tmp_path / "run")


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]


# --------------------------------------------------------------------------------------------- the loss


def test_normalized_terms_divide_by_the_teacher_norm_per_sample():
    torch.manual_seed(0)
    base = torch.randn(3, 4, 5, 5)
    teacher = [base * scale for scale in (1.0, 10.0, 100.0)]
    student = [t * 1.1 for t in teacher]  # the same 10% relative error at every magnitude
    raw, normalized = feature_terms(student, teacher)
    for s, t, r, n in zip(student, teacher, raw, normalized):
        assert r.item() == pytest.approx((s - t).pow(2).mean().item(), rel=1e-6)
        per_sample = [((s[i] - t[i]).pow(2).sum() / t[i].pow(2).sum()).item() for i in range(3)]
        assert n.item() == pytest.approx(sum(per_sample) / 3, rel=1e-6)
        assert n.item() == pytest.approx(0.01, rel=1e-5)
    assert raw[2] / raw[0] == pytest.approx(1e4, rel=1e-3)  # plain KD: the large stage is 10⁴ times louder


def test_teacher_features_carry_no_gradient():
    student = [torch.randn(2, 3, 4, 4, requires_grad=True)]
    teacher = [torch.randn(2, 3, 4, 4, requires_grad=True)]
    _, normalized = feature_terms(student, teacher)
    normalized[0].backward()
    assert student[0].grad is not None and teacher[0].grad is None


def test_feature_taps_survive_ddp_and_compile_style_wrappers(tmp_path):
    """Hooks go on the unwrapped model (BK-SDM registered them on the DDP wrapper's attribute path and broke)."""
    import torch.distributed as dist

    unet = resolve_model("random:tiny-sd15").unet
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(unet)
        assert unwrap(wrapped) is unet
        taps = FeatureTaps(wrapped)
        from laptop_deploy.models.unet_io import example_inputs

        wrapped(**example_inputs(unet.config, batch=1, generator=torch.Generator().manual_seed(0)))
        features = taps.pop()
        taps.remove()
    finally:
        dist.destroy_process_group()
    assert taps.names == ["down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block",
                          "up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3"]
    assert [f.shape[1] for f in features] == [32, 64, 128, 128, 128, 128, 128, 64, 32]


def test_normalization_removes_the_magnitude_imbalance_from_the_logged_terms(tmp_path):
    """Trained SD's stage features differ in magnitude by orders; plain feature KD is then dominated by the loud
    stages. Made here by scaling the mid block's residual branches ×100 (its output and everything after it grow,
    the down stages do not), in teacher and student alike; the logs of both runs show the spread of the terms."""
    spreads = {}
    for norm in ("none", "l2"):
        teacher = resolve_model("random:tiny-sd15")
        with torch.no_grad():
            for resnet in teacher.unet.mid_block.resnets:
                resnet.conv2.weight.mul_(100)
                resnet.conv2.bias.mul_(100)
        run = _run(tmp_path / norm, teacher, steps=2, feature_norm=norm)
        run.run()
        record = [r for r in _log(run.out) if r.get("step") == 2 and "feat_contrib" in r][0]
        terms = [v for v in record["feat_contrib"].values() if v > 0]
        spreads[norm] = max(terms) / min(terms)
        raw = [v for v in record["feat_raw"].values() if v > 0]
        assert record["feat"] == pytest.approx(sum(record["feat_contrib"].values()), rel=1e-5)
        if norm == "none":
            assert terms == pytest.approx(raw)
    assert spreads["none"] > 1000 and spreads["l2"] * 20 < spreads["none"], spreads


# ------------------------------------------------------------------------------------------ the training


def test_training_halves_the_distillation_loss_in_200_cpu_steps(tmp_path):
    """The acceptance run: random:tiny-sd15, data-free, seeded, 200 steps at batch 2 (lr 1e-3), on the BK-SDM-Base
    student, which keeps a ResNet in every stage; the result (the EMA) more than halves the loss (8.19 → 3.59;
    the online weights reach 4.06). A student with a whole stage emptied — the 50% LAPTOP-Diff set above empties
    down_blocks.3 and the mid block — has an irreducible feature-KD floor there (an identity stage cannot output
    both the teacher's stage input and its output): its loss falls only ~10% in the same run."""
    from laptop_deploy.prune.handcrafted import handcrafted_removal

    teacher = resolve_model("random:tiny-sd15")
    run = _run(tmp_path, teacher, removed=handcrafted_removal("bk-sdm-base", teacher.unet.config), steps=200,
               ema_decay=0.9999)
    summary = run.run()
    start, end = summary["eval"]["start"]["total"], summary["eval"]["end_ema"]["total"]
    assert end < 0.5 * start, (start, end)
    assert summary["eval"]["end"]["total"] < 0.6 * start
    steps = [r for r in _log(run.out) if "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 201))
    assert {"task", "out", "feat", "feat_raw", "feat_normalized", "feat_contrib", "lr", "grad_norm"} <= set(steps[0])


def test_the_output_is_the_ema_student_in_the_student_format(tmp_path):
    run = _run(tmp_path, steps=3, ema_decay=0.999, lambda_feat=0.0)
    summary = distill(run)
    student = load_student(run.out)
    assert sorted(summary["eval"]) == ["end", "end_ema", "start"]
    assert summary["stages"] == []  # --lambda-feat 0: no taps
    meta = json.loads((run.out / "laptop_deploy_student.json").read_text())
    assert meta["removed"] == REMOVED and meta["distilled"]["steps"] == 3 and meta["distilled"]["ema"]
    assert (run.out / SUMMARY_FILE).is_file() and not (run.out / ".student-staging").exists()
    # Written: the EMA weights of the last checkpoint, not the online weights (nor the untrained start).
    checkpoint = torch.load(run.out / "checkpoints" / "last.pt", weights_only=True)
    saved = read_safetensors(run.out / "student.safetensors")
    start = _pair(resolve_model("random:tiny-sd15")).unet.state_dict()
    name = "conv_in.weight"
    assert torch.equal(saved[name], checkpoint["ema"][name]) and torch.equal(saved[name], student.state_dict()[name])
    assert not torch.equal(saved[name], checkpoint["student"][name]) and not torch.equal(saved[name], start[name])


def test_gradient_accumulation_of_two_halves_equals_one_full_batch(tmp_path):
    """Sample positions, not micro-batches, seed the draws: K micro-batches of B/K see the samples of one batch of
    B, their logged loss is that batch's, and so is the (clipped) gradient — compared through AdamW's first moment
    after one step, (1 − β₁)·g (the weights themselves differ by ±lr wherever g is rounding noise around 0)."""
    runs = [_run(tmp_path / "full", steps=1, batch_size=4, lambda_feat=0.0),
            _run(tmp_path / "halves", steps=1, batch_size=2, grad_accum=2, lambda_feat=0.0)]
    records, moments = [], []
    for run in runs:
        run.run()
        records.append([r for r in _log(run.out) if "event" not in r][0])
        state = torch.load(run.out / "checkpoints" / "last.pt", weights_only=True)["optimizer"]["state"]
        moments.append(torch.cat([s["exp_avg"].flatten() for _, s in sorted(state.items())]))
    assert records[0]["total"] == pytest.approx(records[1]["total"], rel=1e-5)
    assert records[0]["samples"] == records[1]["samples"] == 4
    relative = ((moments[0] - moments[1]).norm() / moments[1].norm()).item()
    assert relative < 1e-5, relative  # float summation order only (~1e-7 with 1 or 2 threads)


# ---------------------------------------------------------------------------------------- kill and resume


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "laptop_deploy", "distill", *argv]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    teacher = resolve_model("random:tiny-sd15")
    out = tmp_path_factory.mktemp("student") / "student"
    save_student(_pair(teacher).unet, out, teacher=teacher.describe())
    return out


def _distill_args(student: Path, prompts: Path, out: Path, steps: int) -> list[str]:
    return ["--teacher", "random:tiny-sd15", "--student", str(student), "--prompts", str(prompts), "--out",
            str(out), "--steps", str(steps), "--batch-size", "2", "--lr", "1e-3", "--checkpoint-every", "5",
            "--ema-decay", "0.99", "--warmup-steps", "3", "--json"]


def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(tmp_path, student_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = 24
    straight = tmp_path / "straight"
    subprocess.run(_cli(*_distill_args(student_dir, prompts, straight, steps)), check=True, env=env,
                   capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_cli(*_distill_args(student_dir, prompts, killed, steps)), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        log = killed / LOG_FILE
        if log.is_file() and any(json.loads(line).get("step", 0) >= 8 for line in log.read_text().splitlines()
                                 if line.endswith("}")):
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "laptop_deploy_student.json").exists()  # no student from a killed run
    logged = [json.loads(line) for line in (killed / LOG_FILE).read_text().splitlines() if line.endswith("}")]
    assert max(r.get("step", 0) for r in logged) < steps

    result = subprocess.run(_cli(*_distill_args(student_dir, prompts, killed, steps), "--resume"), env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["resumed_from_step"] in (5, 10, 15, 20)
    a = read_safetensors(straight / "student.safetensors")
    b = read_safetensors(killed / "student.safetensors")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert a.keys() == b.keys() and worst <= 1e-6, worst
    steps_logged = [r["step"] for r in _log(killed) if "event" not in r]
    assert steps_logged == list(range(1, steps + 1))  # the killed run's extra lines were dropped on resume


# -------------------------------------------------------------------------------------------- bad input


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("change, message", [
    ({"--steps": "0"}, "--steps must be at least 1"),
    ({"--data": "MISSING"}, "no such folder"),
    ({"--student": "MISMATCH"}, "does not match teacher"),
    ({"--out": "FILE"}, "is an existing file"),
    ({"--out": "UNWRITABLE"}, "cannot write there"),
    ({"--lr": "-1"}, "--lr must be a positive number"),
    ({"--mixed-precision": "bf16", "--device": "cpu"}, "needs a CUDA GPU"),
    ({"--resume": None}, "no checkpoint"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(capsys, tmp_path, student_dir, change, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    args = {"--teacher": "random:tiny-sd15", "--student": str(student_dir), "--prompts": str(prompts),
            "--out": str(tmp_path / "out"), "--steps": "2", "--batch-size": "1"}
    if change.get("--data") == "MISSING":
        del args["--prompts"]
        change = {"--data": str(tmp_path / "missing")}
    if change.get("--student") == "MISMATCH":
        sdxl = resolve_model("random:tiny-sdxl")
        save_student(sdxl.unet, tmp_path / "sdxl", teacher=sdxl.describe())
        change = {"--student": str(tmp_path / "sdxl")}
    if change.get("--out") == "FILE":
        (tmp_path / "file").write_text("x")
        change = {"--out": str(tmp_path / "file")}
    if change.get("--out") == "UNWRITABLE":
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        # root writes through permission bits: use /proc there, which nobody can create folders in
        change = {"--out": str((locked if os.geteuid() else Path("/proc")) / "laptop-deploy-out")}
    args.update(change)
    argv = [part for key, value in args.items() for part in ((key,) if value is None else (key, value))]
    code, out, err = _main(capsys, "distill", *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_corrupt_image_is_skipped_and_counted(capsys, tmp_path, student_dir):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (40, 40), colour).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a {colour} square")
    (data / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (data / "3.txt").write_text("broken")
    (data / "4.png").write_bytes((data / "0.png").read_bytes())  # no caption: skipped too
    argv = ["distill", "--teacher", "random:tiny-sd15", "--student", str(student_dir), "--data", str(data),
            "--out", str(tmp_path / "out"), "--steps", "2", "--batch-size", "2", "--cache-dir", str(tmp_path / "c")]
    code, out, err = _main(capsys, *argv)
    assert code == 0, err
    assert "skipped 1 unreadable images and 1 without a caption (first: 3.png)" in out
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert summary["data"]["samples"] == 3 and summary["options"]["lambda_task"] == 1.0
    # The second run reads the cache instead of encoding again.
    code, out, err = _main(capsys, *argv[:-4], "--out", str(tmp_path / "again"), "--cache-dir", str(tmp_path / "c"),
                           "--json")
    assert code == 0 and json.loads(out)["data"]["cached"] is True


def test_two_processes_under_torchrun_equal_one_process_with_twice_the_batch(tmp_path, student_dir):
    """The DDP path for real (gloo on the CPU): 2 ranks × batch 1 draw the positions of 1 rank × batch 2, so the
    averaged gradient — AdamW's first moment (1 − β₁)·g after one step — matches up to float summation order;
    rank 0 alone reports and writes."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--teacher", "random:tiny-sd15", "--student", str(student_dir), "--prompts", str(prompts),
              "--steps", "1", "--lr", "1e-3", "--device", "cpu", "--json"]
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(port), "-m", "laptop_deploy", "distill", *common,
                          "--batch-size", "1", "--out", str(tmp_path / "ddp")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    summary = json.loads(ddp.stdout)  # one JSON document: only rank 0 printed
    assert summary["world_size"] == 2 and summary["samples_per_step"] == 2
    single = subprocess.run(_cli(*common, "--batch-size", "2", "--out", str(tmp_path / "single")), env=env,
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    moments = []
    for run in ("ddp", "single"):
        state = torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True)["optimizer"]["state"]
        moments.append(torch.cat([s["exp_avg"].flatten() for _, s in sorted(state.items())]))
    relative = ((moments[0] - moments[1]).norm() / moments[1].norm()).item()
    assert relative < 1e-5, relative  # float summation order only (measured ~1e-7)
    assert load_student(tmp_path / "ddp") is not None


def test_the_toy_teacher_distills_quietly_through_the_cli(capsys, tmp_path):
    """The shipped toy teacher (a saved pipeline folder) as --teacher: its parts load without progress bars on
    stderr, and the student written is loadable as a model spec."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle at the top left\na blue square in the middle\n")
    teacher = resolve_model("toy")
    save_student(_pair_toy(teacher).unet, tmp_path / "student", teacher=teacher.describe())
    code, out, err = _main(capsys, "distill", "--teacher", "toy", "--student", str(tmp_path / "student"),
                           "--prompts", str(prompts), "--steps", "2", "--batch-size", "2", "--lr", "1e-4",
                           "--out", str(tmp_path / "run"))
    assert code == 0 and err == "", err
    assert resolve_model(str(tmp_path / "run")).kind == "student"


def _pair_toy(teacher: ModelSource) -> ModelSource:
    from laptop_deploy.models.layers import discover_layers

    attention = [layer.name for layer in discover_layers(teacher.unet)[0] if layer.prunable and
                 layer.kind == "attention"][:2]
    return _pair(teacher, attention)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_the_task_target_follows_the_teachers_prediction_type(prediction):
    from laptop_deploy.prune.calibration import alphas_cumprod

    teacher = resolve_model("random:tiny-sd15")
    data = prompt_data(teacher, PROMPTS, latent_size=(16, 16))
    schedule = alphas_cumprod(teacher)
    inputs, target = data.draw(start=0, batch_size=3, seed=0, alphas_cumprod=schedule, prediction=prediction)
    _, noise = data.draw(start=0, batch_size=3, seed=0, alphas_cumprod=schedule, prediction="epsilon")
    _, clean = data.draw(start=0, batch_size=3, seed=0, alphas_cumprod=schedule, prediction="sample")
    a = schedule[inputs["timestep"]].view(-1, 1, 1, 1).float()
    assert torch.allclose(inputs["sample"], a.sqrt() * clean + (1 - a).sqrt() * noise, atol=1e-6)
    expected = {"epsilon": noise, "sample": clean, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * clean}
    assert torch.allclose(target, expected[prediction], atol=1e-6)
