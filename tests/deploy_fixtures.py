"""Helpers shared by the export / runtime / verify / bench tests (imported by them; not a test module)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from laptop_deploy.models.layers import apply_removal
from laptop_deploy.deploy.manifest import model_hash
from laptop_deploy.models.sources import ModelSource, resolve_model
from laptop_deploy.deploy.spec import build_spec
from laptop_deploy.outputs import write_atomically

# Students of the tiny presets: ResNets, whole attentions and (SDXL) single transformer blocks removed.
STUDENT_REMOVALS = {
    "random:tiny-sd15": ["down_blocks.0.attentions.1", "down_blocks.1.resnets.1", "mid_block.attentions.0",
                         "up_blocks.1.resnets.1", "up_blocks.3.attentions.2"],
    "random:tiny-sdxl": ["down_blocks.0.resnets.1", "down_blocks.2.attentions.0.transformer_blocks.3",
                         "mid_block.resnets.1", "up_blocks.0.attentions.1", "up_blocks.2.resnets.1"],
}


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run tiny models on one thread: as fast as two for these widths, and immune to OpenMP's busy-waiting when
    another process shares the two cores (which slows a 2-thread tiny forward ~100x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_source(spec: str, *, student: bool = False) -> ModelSource:
    """A seeded tiny preset, optionally turned into its student (removal in place, as `prune` does)."""
    source = resolve_model(spec)
    if student:
        apply_removal(source.unet, STUDENT_REMOVALS[spec])
        source.removed = list(STUDENT_REMOVALS[spec])
    return source


def export_artifact(source: ModelSource, out: Path, *, target: str = "onnx", precision: str = "fp32",
                    dynamic: bool = False, exporter: str = "dynamo", **spec_args) -> Path:
    """What `laptop-deploy export` does, from an already resolved source (tests reuse sources)."""
    from laptop_deploy.exporters import get_exporter

    module = get_exporter(target)
    spec = build_spec(source.unet.config, precision=precision, dynamic=dynamic, **spec_args)
    described = {**source.describe(), "sha256": model_hash(source.unet)}
    write_atomically(out, lambda tmp: module.export(source.unet, spec, tmp, source=described,
                                                    options=module.Options(exporter=exporter)))
    return out


def assert_exit_2(capsys, argv: list[str], message: str) -> None:
    """The CLI refuses ``argv`` with exit 2, nothing on stdout and one stderr line containing ``message``."""
    from laptop_deploy.cli.main import main

    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (code, out, err)
    assert err.count("\n") == 1 and message in err, err
