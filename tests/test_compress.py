"""`compress`: the stage machinery (fingerprints, skip, redo, SIGKILL + resume), recipe validation (exit 2, nothing
written), and the whole chain on random:tiny-sd15 (in-process by default; with a kill in every stage under -m slow)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from deploy_fixtures import torch_threads

from laptop_deploy.cli.main import main
from laptop_deploy.compress.recipe import Recipe, build_recipe, load_config
from laptop_deploy.compress.stages import KILL_ENV, Stage, fingerprint, open_run_folder, read_done, run_stages

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ the stage machinery


def _stages(calls: list[str], settings: dict[str, int]) -> list[Stage]:
    """a → b → c, plus d that reads nothing: each writes its settings and its input's file through the safe
    output function (real files, as the real stages do)."""
    from laptop_deploy.outputs import write_atomically

    def make(name: str, source: str | None):
        def run(ctx):
            calls.append(name)
            upstream = (ctx.run_dir / source / "value.txt").read_text() if source else ""
            text = f"{upstream}{name}{settings[name]};"
            write_atomically(ctx.folder, lambda tmp: (tmp / "value.txt").write_text(text), kind="test",
                             entries=["stage.json"])
            return {"value": text}
        return run

    return [Stage("a", {"x": settings["a"]}, make("a", None)),
            Stage("b", {"x": settings["b"]}, make("b", "a"), inputs=("a",)),
            Stage("d", {"x": settings["d"]}, make("d", None)),
            Stage("c", {"x": settings["c"]}, make("c", "b"), inputs=("b",))]


def test_stages_skip_when_unchanged_and_redo_exactly_what_follows_a_change(tmp_path):
    run_dir = tmp_path / "run"
    open_run_folder(run_dir, ["a", "b", "c", "d"], "# recipe\n")
    calls: list[str] = []
    settings = {"a": 1, "b": 1, "c": 1, "d": 1}
    first = run_stages(run_dir, _stages(calls, settings))
    assert calls == ["a", "b", "d", "c"] and [o.status for o in first] == ["ran"] * 4
    assert (run_dir / "c" / "value.txt").read_text() == "a1;b1;c1;"
    calls.clear()
    again = run_stages(run_dir, _stages(calls, settings))
    assert calls == [] and [o.status for o in again] == ["skipped"] * 4
    assert [o.fingerprint for o in again] == [o.fingerprint for o in first]
    settings["b"] = 2  # b and what reads it (c) re-run; a and the independent d do not
    changed = run_stages(run_dir, _stages(calls, settings))
    assert calls == ["b", "c"] and [o.status for o in changed] == ["skipped", "ran", "skipped", "ran"]
    assert (run_dir / "c" / "value.txt").read_text() == "a1;b2;c1;"
    assert read_done(run_dir / "c")["fingerprint"] == changed[3].fingerprint != first[3].fingerprint


def test_fingerprint_covers_settings_and_inputs():
    stage = Stage("s", {"k": 1}, lambda ctx: {}, inputs=("p",))
    base = fingerprint(stage, {"p": "sha256:1"})
    assert fingerprint(stage, {"p": "sha256:1"}) == base
    assert fingerprint(stage, {"p": "sha256:2"}) != base
    assert fingerprint(Stage("s", {"k": 2}, lambda ctx: {}, inputs=("p",)), {"p": "sha256:1"}) != base


_KILL_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_compress import _stages
    from laptop_deploy.compress.stages import open_run_folder, run_stages
    run_dir = Path(sys.argv[1])
    open_run_folder(run_dir, ["a", "b", "c", "d"], "# recipe\\n")
    calls = []
    outcomes = run_stages(run_dir, _stages(calls, {{"a": 1, "b": 1, "c": 1, "d": 1}}))
    print(",".join(f"{{o.name}}:{{o.status}}" for o in outcomes))
""")


def test_sigkill_between_work_and_marker_reruns_that_stage_only(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT.format(tests=str(REPO / "tests")))
    run_dir = tmp_path / "run"
    env = {**os.environ, KILL_ENV: "b:end"}
    killed = subprocess.run([sys.executable, str(script), str(run_dir)], env=env, capture_output=True, text=True,
                            cwd=REPO)
    assert killed.returncode == -signal.SIGKILL
    assert read_done(run_dir / "a") is not None and read_done(run_dir / "b") is None
    assert (run_dir / "b" / "value.txt").is_file()  # the work was done, the marker was not written
    env.pop(KILL_ENV)
    done = subprocess.run([sys.executable, str(script), str(run_dir)], env=env, capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "a:skipped,b:ran,d:ran,c:ran"


# ------------------------------------------------------------------------------------------- the recipe


def test_flags_override_the_config_file_and_paths_are_relative_to_it(tmp_path):
    config = tmp_path / "cfg" / "recipe.toml"
    config.parent.mkdir()
    config.write_text('model = "toy"\nbudget = "params=0.5"\nout = "runs/x"\ndistill_steps = 5\nprompts = "p.txt"\n')
    recipe = build_recipe(load_config(config), {"budget": "macs=0.2", "bench_repeats": 5})
    assert (recipe.model, recipe.budget, recipe.distill_steps, recipe.bench_repeats) == ("toy", "macs=0.2", 5, 5)
    assert recipe.out == config.parent / "runs" / "x" and recipe.prompts == config.parent / "p.txt"
    stored = tmp_path / "stored.toml"
    stored.write_text(recipe.to_toml())
    assert build_recipe(load_config(stored), {}) == Recipe(**{**vars(recipe), "out": recipe.out.absolute(),
                                                              "prompts": recipe.prompts.absolute()})


@pytest.mark.parametrize("extra, message", [
    (["--budget", "params"], "expected KIND=R"),
    (["--budget", "flops=0.3"], "expected KIND=R"),
    (["--budget", "params=1.5"], "strictly between 0 and 1"),
    (["--budget", "params=0.97"], "not reachable"),
    (["--target", "nope"], "unknown target 'nope'"),
    (["--runtime", "coreml"], "Core ML prediction requires macOS"),
    (["--prompts", "{tmp}/missing.txt"], "cannot read"),
    (["--data", "{tmp}/no-such-folder", "--distill-steps", "2"], "no such folder"),
    (["--distill-steps", "2"], "needs --data DIR or --prompts FILE"),
    (["--latent-size", "15", "16"], "not a positive multiple"),
    (["--config", "{tmp}/bad.toml"], "unknown key 'modle'"),
    (["--budget", "latency=0.3", "--runtime", "torch"], "runs no exported artifact"),
])
def test_recipe_errors_exit_2_with_nothing_written(tmp_path, capsys, extra, message):
    (tmp_path / "bad.toml").write_text('modle = "toy"\n')
    out = tmp_path / "run"
    argv = ["compress", "--model", "random:tiny-sd15", "--budget", "params=0.3", "--out", str(out)]
    argv += [arg.replace("{tmp}", str(tmp_path)) for arg in extra]
    if sys.platform == "darwin" and extra == ["--runtime", "coreml"]:
        pytest.skip("Core ML runs on macOS: the runtime is available there")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("laptop-deploy:")]
    assert len(errors) == 1 and message in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not out.exists()


def test_run_folder_of_someone_else_is_refused(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("user data")
    argv = ["compress", "--model", "random:tiny-sd15", "--budget", "params=0.3", "--out", str(out)]
    assert main(argv) == 2
    assert "did not write" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------------------------------- the whole chain

CHEAP = ["--model", "random:tiny-sd15", "--budget", "params=0.3", "--calib", "2", "--additivity-sets", "0",
         "--exporter", "torchscript", "--verify-steps", "2", "--bench-iterations", "1", "--bench-repeats", "1",
         "--grid-prompts", "1", "--report-steps", "2"]
DISTILL = ["--distill-steps", "3", "--batch-size", "2", "--checkpoint-every", "1"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stage_status(capsys) -> dict[str, str]:
    data = json.loads(capsys.readouterr().out)
    return {s["name"]: s["status"] for s in data["stages"]}


def test_full_chain_then_a_late_setting_reruns_only_bench_and_report(tmp_path, capsys):
    out = tmp_path / "run"
    with torch_threads(1):
        assert main(["compress", *CHEAP, "--out", str(out), "--json"]) == 0
        data_first = (out / "prune" / "stage.json").read_text()
        status = _stage_status(capsys)
        assert set(status.values()) == {"ran"} and list(status) == ["prune", "export", "export-teacher", "verify",
                                                                      "bench", "report"]
        plan = json.loads((out / "prune" / "pruning_plan.json").read_text())
        report = json.loads((out / "report" / "report.json").read_text())
        rows = {row["what"]: row for row in report["rows"]}
        assert rows["parameters"]["student"] == plan["params_after"] < plan["params_before"] == \
            rows["parameters"]["teacher"]
        manifest = json.loads((out / "export" / "manifest.json").read_text())
        assert manifest["files"]["model.onnx"]["sha256"].removeprefix("sha256:") == \
            _sha(out / "export" / "model.onnx")
        assert rows["artifact size"]["student"] == manifest["files"]["model.onnx"]["bytes"]
        assert report["verify_passed"] is True and (out / "report" / "samples.png").is_file()
        assert "**Verify: PASSED**" in (out / "report" / "report.md").read_text()
        assert main(["compress", *CHEAP, "--bench-iterations", "2", "--out", str(out), "--json"]) == 0
        status = _stage_status(capsys)
        assert [n for n, s in status.items() if s == "ran"] == ["bench", "report"]
        assert (out / "prune" / "stage.json").read_text() == data_first
        # an impossible parity floor: verify fails (exit 1), the report is still written and says so
        assert main(["compress", *CHEAP, "--bench-iterations", "2", "--min-psnr", "500", "--out", str(out),
                     "--json"]) == 1
        status = _stage_status(capsys)
    assert [n for n, s in status.items() if s == "ran"] == ["verify", "report"]
    assert "**Verify: FAILED**" in (out / "report" / "report.md").read_text()
    assert json.loads((out / "report" / "report.json").read_text())["verify_passed"] is False


def _cli(args: list[str], *, kill: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(KILL_ENV, None)
    if kill:
        env[KILL_ENV] = kill
    return subprocess.run([sys.executable, "-m", "laptop_deploy", "compress", *args, "--json"], env=env,
                          capture_output=True, text=True, cwd=REPO)


@pytest.mark.slow
def test_sigkill_in_every_stage_resumes_to_the_uninterrupted_result(tmp_path):
    """One run killed (SIGKILL, real process death) once inside or at the end of every stage, rerun after each
    kill, ends with the student weights and artifact digests of an uninterrupted run."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    args = [*CHEAP, *DISTILL, "--prompts", str(prompts)]
    reference = _cli([*args, "--out", str(tmp_path / "reference")])
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "killed"
    kills = ["prune:planned", "distill:step=2", "distill:end", "export:written", "export-teacher:end",
             "verify:end", "bench:end", "report:end"]
    for point in kills:
        killed = _cli([*args, "--out", str(out)], kill=point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-500:])
    final = _cli([*args, "--out", str(out)])
    assert final.returncode == 0, final.stderr
    assert [s["status"] for s in json.loads(final.stdout)["stages"]] == ["skipped"] * 6 + ["ran"]
    for name in ("distill/student.safetensors", "export/model.onnx", "export-teacher/model.onnx"):
        assert _sha(out / name) == _sha(tmp_path / "reference" / name), name
    log = [json.loads(line) for line in (out / "distill" / "distill_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "total" in r and r.get("event") is None] == [1, 2, 3]


@pytest.mark.slow
def test_pipeline_chain_writes_a_verified_bundle(tmp_path):
    from laptop_deploy.compress.recipe import pipeline_support

    if pipeline_support() is not None:
        pytest.skip(f"this build lacks {pipeline_support()}")
    out = tmp_path / "run"
    done = _cli([*CHEAP, "--pipeline", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    bundle = json.loads((out / "export" / "stage.json").read_text())["result"]
    assert bundle["bundle"] and set(bundle["parts"]) >= {"text_encoder", "unet", "vae_decoder"}
    parity = json.loads((out / "verify" / "parity.json").read_text())
    assert parity["passed"] and parity["worst_psnr_db"] >= parity["min_psnr_db"]
    assert (out / "report" / "samples.png").is_file()


@pytest.mark.slow
def test_latency_budget_profiles_once_and_a_new_budget_redoes_prune_onward(tmp_path):
    from laptop_deploy.compress.recipe import latency_support

    if latency_support() is not None:
        pytest.skip(f"this build lacks {latency_support()}")
    out = tmp_path / "run"
    args = [*CHEAP, "--profile-repeats", "3", "--out", str(out)]
    first = _cli([*args[:3], "latency=0.02", *args[4:]])  # args[3] is the budget
    assert first.returncode == 0, first.stderr
    stages = {s["name"]: s["status"] for s in json.loads(first.stdout)["stages"]}
    assert list(stages)[:2] == ["profile", "prune"] and set(stages.values()) == {"ran"}
    latency = json.loads((out / "prune" / "pruning_plan.json").read_text())["latency"]
    assert latency["predicted_ratio"] <= 0.98 + 1e-6
    rows = {row["what"]: row for row in json.loads((out / "report" / "report.json").read_text())["rows"]}
    assert rows["latency (predicted)"]["student"] == latency["predicted_ms"]
    second = _cli([*args[:3], "latency=0.01", *args[4:]])
    assert second.returncode == 0, second.stderr
    stages = {s["name"]: s["status"] for s in json.loads(second.stdout)["stages"]}
    assert [n for n, s in stages.items() if s == "skipped"] == ["profile", "export-teacher"]
