"""``--target executorch --precision int8``: XNNPACK's PT2E quantizer calibrated on the captured denoising inputs,
gated by held-out PSNR (exporters/executorch_int8.py).

Default suite (with the ``[executorch]`` extra; skipped without it): option errors through the CLI (exit 2,
nothing written), the MAC split of a real converted graph (conv and linear int8, a bmm float), the PSNR gate
on a real ``.pte``, the keep-float fallback (``executorch_keep.py``: its bypass equals the quantizer's own opt-out;
the search keeps the most sensitive units float and fails naming the PSNR) and, through the CLI, tiny SD-1.5 refused
with exit 1 naming the PSNR when nothing may be kept float. Quantizing and lowering a tiny U-Net takes minutes on
two shared cores: the CLI's export → verify → bench on ``toy`` and tiny SD-1.5's export with units kept float are
``-m slow``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("executorch", reason="the ExecuTorch target needs the [executorch] extra: "
                                         "pip install '.[executorch]'")

from deploy_fixtures import assert_exit_2, torch_threads
from laptop_deploy.cli.main import main
from laptop_deploy.deploy.spec import build_spec, torch_inputs
from laptop_deploy.errors import CheckFailed
from laptop_deploy.exporters import executorch as et
from laptop_deploy.exporters import executorch_int8 as q
from laptop_deploy.exporters import executorch_keep as keep
from laptop_deploy.exporters.int8_calib import Captured
from laptop_deploy.exporters.int8_groups import unit_of
from laptop_deploy.models.sources import resolve_model


class ConvLinearBmm(nn.Module):
    """sample [1, C, H, W], timestep [1], text [1, 77, D] -> [1, C, H, W]: a 3x3 conv and a linear (which the
    quantizer annotates) and a bmm of two activations (which it does not)."""

    def __init__(self, channels: int, text_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.proj = nn.Linear(text_dim, channels)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.conv(sample)
        b, c, height, width = h.shape
        context = self.proj(text)  # [B, 77, C]
        scores = torch.bmm(h.flatten(2).transpose(1, 2), context.transpose(1, 2))  # [B, HW, 77]
        mixed = torch.bmm(scores.softmax(-1), context)  # [B, HW, C]
        return h + mixed.transpose(1, 2).reshape(b, c, height, width) * (timestep / 1000)[:, None, None, None]


@pytest.fixture(scope="module")
def spec():
    return build_spec(resolve_model("random:tiny-sd15", materialize=False).unet.config)


@pytest.fixture(scope="module")
def converted(spec):
    """(module, converted graph module, program) of ConvLinearBmm through the quantizer's prepare/convert."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    torch.manual_seed(0)
    module = ConvLinearBmm(spec.inputs[0].shape[1], spec.inputs[2].shape[2]).eval()
    args = torch_inputs(spec, spec.example_feeds(seed=0))
    with torch_threads(1), torch.no_grad():
        prepared = prepare_pt2e(torch.export.export(module, args, strict=False).module(),
                                q.make_quantizer(q.EtInt8Options()))
        for seed in range(3):
            prepared(*torch_inputs(spec, spec.example_feeds(seed=seed)))
        program = torch.export.export(convert_pt2e(prepared), args, strict=False)
    return module, program


def test_compute_split_counts_int8_conv_linear_and_float_bmm(spec, converted):
    _, program = converted
    split = q.compute_split(program.graph_module)
    channels, (height, width) = spec.inputs[0].shape[1], spec.inputs[0].shape[2:]
    text_dim, tokens = spec.inputs[2].shape[2], spec.inputs[2].shape[1]
    conv = channels * height * width * channels * 9
    linear = tokens * channels * text_dim
    bmm = height * width * tokens * channels * 2  # scores [HW, 77] over C, mixed [HW, C] over 77
    assert (split["quantized_nodes"], split["float_nodes"]) == (2, 2), split
    assert split["quantized_macs"] == conv + linear
    assert split["float_macs"] == bmm
    assert split["float_mac_share"] == pytest.approx(bmm / (conv + linear + bmm), abs=1e-4)
    assert split["float_ops"] == {"bmm": 2}


def test_minmax_swaps_only_the_activation_observer():
    histogram = q.quantization_config(q.EtInt8Options())
    minmax = q.quantization_config(q.EtInt8Options(calib_method="minmax"))
    assert "HistogramObserver" in repr(histogram.input_activation.observer_or_fake_quant_ctr)
    assert "MinMaxObserver" in repr(minmax.input_activation.observer_or_fake_quant_ctr)
    assert minmax.weight == histogram.weight and minmax.output_activation == minmax.input_activation


def test_gate_passes_and_fails_on_held_out_psnr(spec, converted, tmp_path):
    """The gate runs the saved .pte in ExecuTorch's runtime against the held-out fp32 outputs."""
    module, program = converted
    path = tmp_path / et.PTE_FILE
    et.write_program(et.lower(program), path)
    feeds = spec.example_feeds(seed=7)
    feeds["timestep"] = np.array([500.0], dtype=np.float32)
    with torch.no_grad():
        ref = module(*torch_inputs(spec, feeds)).numpy()
    data = Captured(calibration=[], held_out=[(feeds, {"out_sample": ref})], prompts=[], held_out_prompts=[],
                    seconds=0.0)
    record = q.gate_pte(path, spec, data, options=q.EtInt8Options(min_psnr=20.0))
    assert 20.0 <= record["int8_psnr_db"] < 80.0, record  # int8 noise: well above the gate, far from exact
    assert record["int8_min_psnr_db"] == 20.0 and len(record["int8_held_out"]) == 1
    with pytest.raises(CheckFailed, match=r"int8 gate: held-out PSNR of the \.pte [0-9.]+ dB < --min-psnr 90 dB"):
        q.gate_pte(path, spec, data, options=q.EtInt8Options(min_psnr=90.0))


class Chain(nn.Module):
    """sample [1, C, H, W], timestep [1], text [1, 77, D] -> [1, C, H, W]: conv_in → SiLU → conv_mid (+ residual) →
    conv_out, plus a text projection added per channel — quantized producers feeding float consumers and back."""

    def __init__(self, channels: int, text_dim: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(channels, 16, 3, padding=1)
        self.conv_mid = nn.Conv2d(16, 16, 3, padding=1)
        self.conv_out = nn.Conv2d(16, channels, 3, padding=1)
        self.proj = nn.Linear(text_dim, 16)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(sample)
        h = h + self.conv_mid(torch.nn.functional.silu(h)) + self.proj(text).mean(1)[:, :, None, None]
        return self.conv_out(h) * (timestep / 1000)[:, None, None, None]


def _chain_graph(spec, module, quantizer):
    """torch.export → prepare_pt2e(quantizer) → three seeded calibration inputs (the prepared module)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    args = torch_inputs(spec, spec.example_feeds(seed=0))
    prepared = prepare_pt2e(torch.export.export(module, args, strict=False).module(), quantizer)
    with torch.no_grad():
        for seed in range(3):
            prepared(*torch_inputs(spec, spec.example_feeds(seed=seed)))
    return prepared


@pytest.fixture(scope="module")
def chain(spec):
    """(Chain module, its calibrated graph converted with float weights behind q/dq, held-out data)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    torch.manual_seed(0)
    module = Chain(spec.inputs[0].shape[1], spec.inputs[2].shape[2]).eval()
    with torch_threads(1), torch.no_grad():
        converted = convert_pt2e(_chain_graph(spec, module, q.make_quantizer(q.EtInt8Options())),
                                 fold_quantize=False)
        held_out = [(feeds, {"out_sample": module(*torch_inputs(spec, feeds)).numpy()})
                    for feeds in (spec.example_feeds(seed=s) for s in (11, 12))]
    return module, converted, Captured(calibration=[], held_out=held_out, prompts=[], held_out_prompts=[],
                                       seconds=0.0)


@pytest.mark.parametrize("float_units", [{"conv_mid"}, {"conv_in", "proj"}, {"conv_out"}])
def test_bypass_equals_the_quantizers_own_opt_out(spec, chain, float_units):
    """Bypassing the pairs of the float nodes in the all-int8 graph gives bit for bit what the quantizer produces
    when its filter refuses those modules (a second prepare and calibration)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    module, converted, data = chain
    quantizer = q.make_quantizer(q.EtInt8Options())
    base = quantizer.filter_fn
    quantizer.set_filter_function(lambda n: base(n) and not (n.op == "call_function" and keep.scope(n) in
                                                             float_units))
    with torch_threads(1), torch.no_grad():
        opted_out = convert_pt2e(_chain_graph(spec, module, quantizer))
        args = torch_inputs(spec, data.held_out[0][0])
        expected, all_int8 = opted_out(*args), converted(*args)
        groups = keep.node_groups(converted)
        assert sorted(groups) == ["conv_in", "conv_mid", "conv_out", "proj"]
        quantized = {n for g, nodes in groups.items() if g not in float_units for n in nodes}
        with keep.bypassed(converted, keep.float_edges(converted, quantized)):
            got = converted(*args)
        assert torch.equal(converted(*args), all_int8)  # restored
    assert torch.equal(got, expected)
    assert not torch.equal(got, all_int8)  # the bypass changed something


def test_search_keeps_the_most_sensitive_units_float_and_fails_naming_the_psnr(spec, chain):
    """On the converted graph: all int8 is below a gate set between it and float; the search scores each unit
    alone, keeps the most sensitive float until the reference passes the gate plus the margin for XNNPACK's
    kernels, and records it; an impossible gate or no allowed float share is CheckFailed naming the PSNR reached."""
    import copy

    _, converted, data = chain
    with torch_threads(1):
        start = min(keep.torch_psnr(converted, spec, data.held_out))
        record = keep.search(copy.deepcopy(converted), spec, data, min_psnr=start, max_share=1.0)
        sensitivity = record["int8_group_sensitivity_db"]
        assert sorted(sensitivity) == ["conv_in", "conv_mid", "conv_out", "proj"]
        kept = record["int8_kept_float_groups"]
        assert kept == sorted(sensitivity, key=sensitivity.get)[:len(kept)] and kept
        log = record["int8_gate_log"]
        assert record["int8_search_target_db"] == start + keep.REFERENCE_MARGIN_DB
        assert log[0]["psnr_db"] == round(start, 2) and len(log) == len(kept) + 1
        assert log[-1]["psnr_db"] >= round(start + keep.REFERENCE_MARGIN_DB, 2) >= log[-2]["psnr_db"]
        assert 0 < record["int8_kept_float_mac_share"] == log[-1]["float_mac_share"] <= 1.0
        with pytest.raises(CheckFailed, match=r"int8 gate: held-out PSNR [0-9.]+ dB \(PT2E reference\) < 501 dB "
                                              r"\(--min-psnr 500 \+ 1 for XNNPACK's kernels\) with 4 of 4 node groups"):
            keep.search(copy.deepcopy(converted), spec, data, min_psnr=500.0, max_share=1.0)
        with pytest.raises(CheckFailed, match=rf"held-out PSNR {start:.2f} dB \(PT2E reference\) < [0-9.]+ dB "
                                              rf"\(--min-psnr [0-9.]+ \+ 1 for XNNPACK's kernels\) with 0 of 4"):
            keep.search(copy.deepcopy(converted), spec, data, min_psnr=start, max_share=0.0)


def test_cli_refuses_an_impossible_gate_naming_the_psnr(capsys, tmp_path):
    """tiny SD-1.5 int8 cannot reach --min-psnr 60 (a short calibration: ~34 dB held out) and with
    --max-float-share 0 nothing may be kept float: the export exits 1 before lowering, names the PSNR reached and
    writes nothing."""
    out = tmp_path / "art"
    with torch_threads(1):
        code = main(["export", "--model", "random:tiny-sd15", "--target", "executorch", "--precision", "int8",
                     "--calib-prompts", "1", "--calib-steps", "2", "--min-psnr", "60", "--max-float-share", "0",
                     "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists(), err
    assert re.search(r"int8 gate: held-out PSNR [23][0-9]\.[0-9]{2} dB \(PT2E reference\) < 61 dB \(--min-psnr 60 "
                     r"\+ 1 for XNNPACK's kernels\) with 0 of 4[0-9] node groups float \(0\.0% of MACs; "
                     r"--max-float-share 0\)", err), err


@pytest.mark.parametrize("extra, message", [
    (["--precision", "int8", "--dynamic"], "--precision int8 with --dynamic: the int8 .pte is calibrated"),
    (["--precision", "int8", "--calib-method", "entropy"], "--calib-method entropy: --target executorch takes "
                                                          "minmax"),
    (["--precision", "int8", "--max-float-share", "1.5"], "--max-float-share 1.5: must lie in [0, 1]"),
    (["--precision", "int8", "--calib-steps", "1"], "--calib-steps 1: need at least 2 denoising steps"),
    (["--min-psnr", "28"], "--min-psnr: only with --precision int8"),
    (["--precision", "int8-weights"], "--precision int8-weights is not supported by --target executorch; "
                                      "valid: fp32, int8"),
])
def test_bad_int8_options_exit_2_and_write_nothing(capsys, tmp_path, extra, message):
    out = tmp_path / "art"
    argv = ["export", "--model", "random:tiny-sd15", "--target", "executorch", *extra, "--out", str(out)]
    assert_exit_2(capsys, argv, message)
    assert not out.exists()


def _cli(argv: list[str]) -> tuple[int, dict]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([*argv, "--json"])
    return code, json.loads(stdout.getvalue())


@pytest.mark.slow
def test_cli_int8_export_verify_bench(tmp_path):
    """toy → int8 .pte through the CLI: the held-out PSNR gate passes and is recorded, XNNPACK takes every conv and
    matmul and runs the quantize/dequantize pairs, verify judges it by the int8 floor, bench reports the PSNR."""
    out = tmp_path / "art"
    with torch_threads(1):
        code, exported = _cli(["export", "--model", "toy", "--target", "executorch", "--precision", "int8",
                               "--calib-prompts", "2", "--calib-steps", "4", "--out", str(out)])
    assert code == 0 and exported["precision"] == "int8"
    export = exported["export"]
    assert export["int8_psnr_db"] >= export["int8_min_psnr_db"] == 30.0
    assert export["int8_calibration"]["calibration_inputs"] == (2 + 1) * 4
    assert export["delegation"]["compute_delegated_share"] == 1.0
    assert any("quantize_per_tensor" in op for op in export["int8_kernels"]), export["int8_kernels"]
    assert export["int8_compute"]["quantized_nodes"] > 0 and 0 < export["int8_float_mac_share"] < 0.5
    fp32_bytes = sum(p.numel() * 4 for p in resolve_model("toy").unet.parameters())
    assert exported["files"][et.PTE_FILE] < 0.4 * fp32_bytes  # int8 weights: about a quarter of fp32's
    code, verified = _cli(["verify", str(out), "--model", "toy", "--steps", "3"])
    assert code == 0 and verified["passed"] and verified["psnr_db"] >= 25.0, verified["failures"]
    code, bench = _cli(["bench", str(out), "--iterations", "2", "--warmup", "1"])
    assert code == 0 and bench["int8"]["psnr_db"] == export["int8_psnr_db"]


@pytest.mark.slow
def test_cli_tiny_sd15_int8_keeps_units_float_to_pass_the_gate(tmp_path):
    """tiny SD-1.5 (random weights) all int8 misses the 30 dB gate; the export keeps its most sensitive units float
    (PT2E reference scores), lowers once and passes with the .pte; the manifest records what was kept and why."""
    out = tmp_path / "art"
    with torch_threads(1):
        code, exported = _cli(["export", "--model", "random:tiny-sd15", "--target", "executorch", "--precision",
                               "int8", "--out", str(out)])
    assert code == 0, exported
    export = exported["export"]
    log, kept = export["int8_gate_log"], export["int8_kept_float_groups"]
    assert log[0]["kept_float"] is None and log[0]["psnr_db"] < 30.0 and log[-1]["psnr_db"] >= 31.0
    assert kept and kept == [row["kept_float"] for row in log[1:]]
    assert set(kept) <= set(export["int8_group_sensitivity_db"]) and len(export["int8_group_sensitivity_db"]) > 40
    assert {unit_of(module) for module in export["int8_kept_float_modules"]} == set(kept)
    assert 0 < export["int8_kept_float_mac_share"] <= 0.5
    assert export["int8_psnr_db"] >= 30.0 and export["int8_pt2e_reference_psnr_db"] >= 30.0
    assert export["delegation"]["compute_delegated_share"] == 1.0
    float_ops = export["int8_compute"]["float_ops"]  # the kept convolutions/linears run float in the program
    assert float_ops.get("conv2d", 0) + float_ops.get("linear", 0) == len(export["int8_kept_float_modules"])
