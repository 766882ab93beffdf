"""Retraining a pruned student by knowledge distillation from its teacher (LAPTOP-Diff's normalized feature KD).

The loss of one batch, with ε the U-Net outputs and F_l the output of stage l (every down block, the mid block,
every up block)::

    L = λ_task·‖ε_S − target‖² + λ_out·‖ε_S − ε_T‖² + λ_feat·Σ_l D_l
    D_l = ‖F_l^S − F_l^T‖² / ‖F_l^T‖²    (--feature-norm l2: per sample, teacher norm detached, batch mean)
    D_l = mean (F_l^S − F_l^T)²          (--feature-norm none: BK-SDM's plain feature KD)

Squared norms ‖·‖² of the first two terms are element means (MSE), as in BK-SDM. ``target`` is what the teacher predicts, per
its scheduler's ``prediction_type``: the noise, v, or the clean sample x₀; the task term defaults off for data-free runs, where x₀ is noise and the target means little.

Training: AdamW, warm-up then constant or cosine learning rate, gradient accumulation and clipping, an EMA of the
student's weights (the output), CUDA autocast in bf16, or fp16 with loss scaling; fp32 on CPU. Every random number
comes from (seed, sample position) (see :mod:`laptop_deploy.distill.data`), so a checkpoint — written
atomically every N steps with the model, EMA, optimizer, scheduler, loss scaler, RNG states and step — resumes to
the same weights as an uninterrupted run. ``torchrun`` / ``accelerate launch`` start one process per GPU: each wraps
the student in DDP; feature taps are registered on the unwrapped model, so they survive any wrapper.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..prune.calibration import alphas_cumprod, prediction_type
from .data import DistillData, move_to
from .loss import FeatureTaps, distill_loss, mean_records
from .state import (
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    CHECKPOINT_VERSION,
    LOG_FILE,
    SUMMARY_FILE,
    differences,
    fingerprint,
    load_checkpoint,
    logged_start,
    plain_json,
    save_checkpoint,
    truncate_log,
)
from ..errors import DistillError
from ..outputs import as_path
from .options import MIXED_PRECISION, DistEnv, DistillOptions, dist_env, pick_device
from .schedule import Ema, LrSchedule


class NonFiniteLoss(Exception):
    """The training loss of ``step`` (1-based) is NaN or infinite; caught by :meth:`DistillRun.run`."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"step {step}: loss {value}")
        self.step, self.value = step, value


# ------------------------------------------------------------------------------------------- the models


def check_student(teacher: nn.Module, student: nn.Module, *, student_name: str, teacher_name: str) -> None:
    """The student must be the teacher's architecture with units removed: same config, every tensor a teacher's."""
    tc = {k: plain_json(v) for k, v in dict(teacher.config).items() if not k.startswith("_")}
    sc = {k: plain_json(v) for k, v in dict(student.config).items() if not k.startswith("_")}
    for key in sorted(set(tc) | set(sc)):
        if tc.get(key) != sc.get(key):
            raise DistillError(f"student {student_name} does not match teacher {teacher_name}: config '{key}' is "
                               f"{sc.get(key)!r} in the student, {tc.get(key)!r} in the teacher")
    shapes = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
    foreign = [k for k in student.state_dict() if k not in shapes]
    wrong = [k for k, v in student.state_dict().items() if k in shapes and tuple(v.shape) != shapes[k]]
    if foreign or wrong:
        first = (foreign or wrong)[0]
        raise DistillError(f"student {student_name} does not match teacher {teacher_name}: {len(foreign)} tensors "
                           f"the teacher lacks and {len(wrong)} of another shape (first: {first})")



# ------------------------------------------------------------------------------------------- the run


def _init_distributed(device: torch.device) -> None:
    """Join the torchrun / accelerate launch process group (NCCL on CUDA, gloo on the CPU) once."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


@contextmanager
def _autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
        yield


@dataclass
class DistillRun:
    """The models, data and options of one run; :meth:`run` trains and writes ``out``."""

    teacher: nn.Module
    student: nn.Module
    data: DistillData
    options: DistillOptions
    out: Path
    noise_schedule: torch.Tensor
    prediction: str
    teacher_info: dict[str, Any]
    student_info: dict[str, Any]
    progress: Callable[[int, int, dict[str, Any]], None] | None = None
    env: DistEnv = field(default_factory=dist_env)

    @property
    def lambda_task(self) -> float:
        if self.options.lambda_task is not None:
            return self.options.lambda_task
        return 0.0 if self.data.latent_mean is None else 1.0

    def device(self) -> torch.device:
        """The training device; mixed precision on the CPU is refused (the CLI asks before making the run folder)."""
        device = pick_device(self.options.device, self.env)
        if device.type == "cpu" and self.options.mixed_precision != "no":
            raise DistillError(f"--mixed-precision {self.options.mixed_precision} needs a CUDA GPU; on the CPU "
                               f"training runs in fp32 (--mixed-precision no)")
        return device

    def run(self, *, resume: bool = False) -> dict[str, Any]:
        opts, env = self.options, self.env
        device = self.device()
        amp = MIXED_PRECISION[opts.mixed_precision]
        if env.world_size > 1:
            _init_distributed(device)
        torch.manual_seed(opts.seed)
        teacher = self.teacher.to(device).eval().requires_grad_(False)
        student = self.student.to(device).train().requires_grad_(True)
        if opts.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LrSchedule(opts.lr_schedule, opts.warmup_steps,
                                                                           opts.steps))
        scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
        ema = Ema.of(student, opts.ema_decay)
        settings = fingerprint(opts, self.lambda_task, self.teacher_info, self.student_info, self.data, env)
        self.out.mkdir(parents=True, exist_ok=True)
        checkpoint_path = self.out / CHECKPOINT_DIR / CHECKPOINT_FILE
        log_path = self.out / LOG_FILE
        start_step = 0
        if resume:
            state = load_checkpoint(checkpoint_path)
            changed = differences(state["fingerprint"], settings)
            if changed:
                raise DistillError(f"--resume: the checkpoint was made with other settings: {'; '.join(changed[:4])}")
            student.load_state_dict(state["student"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            ema.shadow = {n: t.to(device) for n, t in state["ema"].items()}
            torch.set_rng_state(state["rng"]["torch"])
            if device.type == "cuda" and state["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(state["rng"]["cuda"], device)
            start_step = state["step"]
            if env.main:
                truncate_log(log_path, start_step)
        model = student
        if env.world_size > 1:
            model = nn.parallel.DistributedDataParallel(
                student, device_ids=[device.index] if device.type == "cuda" else None)
        taps = (FeatureTaps(model), FeatureTaps(teacher)) if opts.lambda_feat > 0 else None
        names = taps[0].names if taps else []
        eval_batch = self._eval_batch(device)
        started = time.perf_counter()
        evals: dict[str, Any] = {}
        if start_step == 0:
            evals["start"] = self._evaluate(student, teacher, taps, eval_batch, names, amp)
            self._log(log_path, {"event": "eval", "step": 0, "which": "student", **evals["start"]})
        elif env.main:
            evals.update(logged_start(log_path))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step_seconds: list[float] = []
        stopped: dict[str, Any] | None = None
        try:  # one set of taps (hooks on the unwrapped models) serves training and the final evaluations
            for step in range(start_step, opts.steps):
                tick = time.perf_counter()
                try:
                    record = self._step(step, model, teacher, taps, names, optimizer, scaler, amp, device, params)
                except NonFiniteLoss as exc:  # a check that failed after the run folder was written: exit 1
                    stopped = self._stopped(exc, checkpoint_path)
                    break
                scheduler.step()
                ema.update(student, step)
                record.update({"step": step + 1, "lr": scheduler.get_last_lr()[0],
                               "seconds": time.perf_counter() - tick})
                step_seconds.append(record["seconds"])
                self._log(log_path, record)
                if self.progress is not None and env.main:
                    self.progress(step + 1, opts.steps, record)
                if (step + 1) % opts.checkpoint_every == 0 or step + 1 == opts.steps:
                    self._checkpoint(checkpoint_path, step + 1, student, optimizer, scheduler, scaler, ema,
                                     settings, device)
            seconds = time.perf_counter() - started
            if stopped is not None:
                self._log(log_path, {"event": "stopped", **stopped})
                summary = self._summary(start_step, seconds, step_seconds, evals, device, names, checkpoint_path,
                                        log_path)
                return {**summary, "steps_run": len(step_seconds), "stopped": stopped}
            evals["end"] = self._evaluate(student, teacher, taps, eval_batch, names, amp)
            if opts.ema_decay:
                ema.copy_to(student)
                evals["end_ema"] = self._evaluate(student, teacher, taps, eval_batch, names, amp)
        finally:
            for tap in taps or ():
                tap.remove()
        self._log(log_path, {"event": "end", "step": opts.steps, **{f"eval_{k}": v["total"] for k, v in
                                                                      evals.items()}})
        return self._summary(start_step, seconds, step_seconds, evals, device, names, checkpoint_path, log_path)

    def _step(self, step: int, model: nn.Module, teacher: nn.Module, taps: tuple[FeatureTaps, ...] | None,
              names: list[str], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
              amp: torch.dtype | None, device: torch.device, params: list[nn.Parameter]) -> dict[str, Any]:
        opts, env = self.options, self.env
        records = []
        for micro in range(opts.grad_accum):
            start = ((step * opts.grad_accum + micro) * env.world_size + env.rank) * opts.batch_size
            inputs, target = self.data.draw(start=start, batch_size=opts.batch_size, seed=opts.seed,
                                            alphas_cumprod=self.noise_schedule, prediction=self.prediction,
                                            uncond_prob=opts.uncond_prob)
            inputs, target = move_to(inputs, device), target.to(device)
            with torch.no_grad(), _autocast(device, amp):
                t_out = teacher(**inputs, return_dict=False)[0]
            t_feats = taps[1].pop() if taps else None
            sync = micro == opts.grad_accum - 1 or not isinstance(model, nn.parallel.DistributedDataParallel)
            with nullcontext() if sync else model.no_sync():
                with _autocast(device, amp):
                    s_out = model(**inputs, return_dict=False)[0]
                s_feats = taps[0].pop() if taps else None
                loss, record = distill_loss(opts, lambda_task=self.lambda_task, s_out=s_out, t_out=t_out,
                                            target=target, s_feats=s_feats, t_feats=t_feats, names=names)
                if not math.isfinite(record["total"]):
                    raise NonFiniteLoss(step + 1, record["total"])
                scaler.scale(loss / opts.grad_accum).backward()
            records.append(record)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm if opts.max_grad_norm else math.inf)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        record = mean_records(records)
        record["grad_norm"] = float(grad_norm)
        record["samples"] = opts.batch_size * opts.grad_accum * env.world_size
        return record

    def _stopped(self, exc: NonFiniteLoss, checkpoint: Path) -> dict[str, Any]:
        """What the summary and stderr say when the loss became non-finite: the last good checkpoint is kept."""
        kept = load_checkpoint(checkpoint)["step"] if checkpoint.is_file() else None
        hint = ("with --mixed-precision fp16 this is usually an overflow (use bf16)"
                if self.options.mixed_precision == "fp16" else "lower --lr")
        where = (f"the last good checkpoint (step {kept}) is kept in {checkpoint}" if kept is not None else
                 f"no checkpoint was written before (--checkpoint-every {self.options.checkpoint_every})")
        return {"step": exc.step, "loss": str(exc.value), "checkpoint_step": kept,
                "message": f"the loss became {exc.value} at step {exc.step}; {where}; no student written ({hint})"}

    def _eval_batch(self, device: torch.device) -> tuple[dict[str, Any], torch.Tensor]:
        """A fixed batch (its own random stream) on which the start and end losses are compared."""
        count = min(self.options.eval_samples, max(len(self.data), 1))
        inputs, target = self.data.draw(start=0, batch_size=count, seed=self.options.seed, stream="eval",
                                        alphas_cumprod=self.noise_schedule, prediction=self.prediction)
        return move_to(inputs, device), target.to(device)

    @torch.no_grad()
    def _evaluate(self, student: nn.Module, teacher: nn.Module, taps: Any, batch: Any, names: list[str],
                  amp: torch.dtype | None) -> dict[str, Any]:
        inputs, target = batch
        was_training = student.training
        student.eval()
        with _autocast(target.device, amp):
            t_out = teacher(**inputs, return_dict=False)[0]
            t_feats = taps[1].pop() if taps else None
            s_out = student(**inputs, return_dict=False)[0]
            s_feats = taps[0].pop() if taps else None
        _, record = distill_loss(self.options, lambda_task=self.lambda_task, s_out=s_out, t_out=t_out,
                                 target=target, s_feats=s_feats, t_feats=t_feats, names=names)
        student.train(was_training)
        return record

    def _checkpoint(self, path: Path, step: int, student: nn.Module, optimizer: Any, scheduler: Any, scaler: Any,
                    ema: Ema, fingerprint: dict[str, Any], device: torch.device) -> None:
        if self.env.main:
            save_checkpoint(path, {
                "version": CHECKPOINT_VERSION, "step": step, "fingerprint": fingerprint,
                "samples_seen": step * self.options.batch_size * self.options.grad_accum * self.env.world_size,
                "student": {k: v.detach().cpu() for k, v in student.state_dict().items()},
                "ema": {k: v.cpu() for k, v in ema.shadow.items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}})
        if self.env.world_size > 1:
            torch.distributed.barrier()

    def _log(self, path: Path, record: dict[str, Any]) -> None:
        if self.env.main:
            with open(path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def _summary(self, start_step: int, seconds: float, step_seconds: list[float], evals: dict[str, Any],
                 device: torch.device, names: list[str], checkpoint: Path, log: Path) -> dict[str, Any]:
        opts = self.options
        samples = opts.batch_size * opts.grad_accum * self.env.world_size
        timed = step_seconds[1:] or step_seconds  # the first step pays for allocator and kernel warm-up
        per_step = sum(timed) / len(timed) if timed else None
        if device.type == "cuda":
            peak = {"cuda_peak_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20}
        else:
            from ..memory import peak_rss_mb

            peak = {"cpu_peak_rss_mb": peak_rss_mb()}
        return {
            "teacher": self.teacher_info, "student": self.student_info, "data": self.data.description,
            "options": {**asdict(opts), "lambda_task": self.lambda_task}, "stages": names,
            "prediction_type": self.prediction, "device": str(device), "world_size": self.env.world_size,
            "steps": opts.steps, "resumed_from_step": start_step or None, "steps_run": opts.steps - start_step,
            "seconds": seconds, "steps_per_s": 1 / per_step if per_step else None,
            "samples_per_s": samples / per_step if per_step else None, "samples_per_step": samples, **peak,
            "eval": evals, "checkpoint": str(checkpoint), "log": str(log),
        }


def prepare_run(teacher: Any, student: Any, data: DistillData, options: DistillOptions, out: Path, *,
                progress: Callable[[int, int, dict[str, Any]], None] | None = None) -> DistillRun:
    """A run from two resolved model sources (:class:`~laptop_deploy.models.sources.ModelSource`): checks that the student
    is the teacher with units removed, and takes the noise schedule and prediction type from the teacher."""
    check_student(teacher.unet, student.unet, student_name=student.spec, teacher_name=teacher.spec)
    out = as_path(out, what="out")
    student_info = {"spec": student.spec, "kind": student.kind, "removed": list(student.removed),
                    "params": sum(p.numel() for p in student.unet.parameters())}
    return DistillRun(teacher.unet, student.unet, data, options, out, alphas_cumprod(teacher),
                      prediction_type(teacher), teacher.describe(), student_info, progress)


def distill(run: DistillRun, *, resume: bool = False) -> dict[str, Any]:
    """Train ``run``, then write the (EMA) student into ``run.out`` in the student format, with
    ``distill_summary.json``; the student's metadata file appears last, so a folder is a student only when whole."""
    from ..models.student import publish_student

    summary = run.run(resume=resume)
    summary["out"] = str(run.out)
    if summary.get("stopped") and run.env.main:  # the log and the last good checkpoint stay; no student
        (run.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    elif run.env.main:
        evals = summary["eval"]
        final = evals.get("end_ema", evals["end"])
        publish_student(run.student.cpu().eval(), run.out, teacher=run.teacher_info,
                        extra={"distilled": {"steps": summary["steps"], "feature_norm": run.options.feature_norm,
                                             "ema": bool(run.options.ema_decay), "eval_total": final["total"]}},
                        files={SUMMARY_FILE: json.dumps(summary, indent=2) + "\n"})
    if run.env.world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary
