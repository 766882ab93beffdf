"""int8 export (exporters/onnx_int8.py): the quality gate, the manifest records, int8 verify/bench through the CLI,
bad options. Tiny models only: the gate's sensitivity scan over every node group is ``slow``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402

from deploy_fixtures import torch_threads  # noqa: E402
from laptop_deploy.cli.main import main  # noqa: E402
from laptop_deploy.deploy.manifest import read_manifest  # noqa: E402
from laptop_deploy.deploy.spec import build_spec  # noqa: E402
from laptop_deploy.errors import CheckFailed  # noqa: E402
from laptop_deploy.exporters.int8_graph import INT8_KERNELS, node_groups, unit_of, weights_only  # noqa: E402
from laptop_deploy.exporters.onnx_int8 import Int8Options, keep_float, quantize_onnx  # noqa: E402

FAST = {"calib_prompts": "1", "calib_steps": 2}  # 2 calibration loops (prompt + empty) of 2 steps: 4 inputs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory):
    """`export --precision int8` of random:tiny-sd15 with a forced-low gate (everything quantized), via the CLI."""
    out = tmp_path_factory.mktemp("int8") / "art"
    code = main(["export", "--model", "random:tiny-sd15", "--target", "onnx", "--exporter", "torchscript",
                 "--precision", "int8", "--min-psnr", "0", "--calib-prompts", "1", "--calib-steps", "2",
                 "--out", str(out), "--json"])
    assert code == 0
    return out


def test_forced_low_gate_quantizes_everything_and_records_it(int8_artifact):
    manifest = read_manifest(int8_artifact)
    info = manifest.export
    assert manifest.precision == "int8" and manifest.spec.precision == "int8"
    assert info["int8_kept_float_nodes"] == [] and info["int8_kept_float_groups"] == []
    assert info["int8_float_mac_share"] == 0.0 and info["int8_macs"] > 0
    assert info["int8_quantized_nodes"] > 40  # every Conv / MatMul / Gemm of tiny-sd15
    assert 5.0 < info["int8_psnr_db"] < 80.0 and info["int8_min_psnr_db"] == 0.0
    assert info["int8_calibration"]["calibration_inputs"] == 4 and info["int8_calibration"]["held_out_inputs"] == 2
    assert info["int8_gate_log"] == [{"kept_float": None, "psnr_db": info["int8_psnr_db"], "float_mac_share": 0.0}]
    # ORT's CPU EP really runs integer kernels: QDQ pairs around Conv became QLinearConv
    assert info["int8_kernels"].get("QLinearConv", 0) > 10, info["int8_kernels"]
    # MatMul/Gemm outputs stay float by default: QKᵀ writes float, its Softmax runs float (no QLinearSoftmax)
    assert info["int8_calibration"]["float_outputs"] == ["MatMul", "Gemm"]
    assert info["int8_kernels"].get("Softmax", 0) > 0 and "QLinearSoftmax" not in info["int8_kernels"]
    assert info["int8_kernels"].get("MatMulIntegerToFloat", 0) > 0, info["int8_kernels"]
    assert sum(info["int8_kernels"].get(k, 0) for k in INT8_KERNELS) > 40
    graph = onnx.load(str(int8_artifact / "model.onnx")).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 40
    assert quantized_outputs(graph, "MatMul")[0] == 0 and quantized_outputs(graph, "Gemm")[0] == 0
    assert quantized_outputs(graph, "Conv")[0] == quantized_outputs(graph, "Conv")[1] > 0
    assert {i.name for i in graph.input} == {"sample", "timestep", "encoder_hidden_states"}


def test_int8_verify_states_its_thresholds(int8_artifact, capsys):
    code, out, _ = run(capsys, "verify", str(int8_artifact), "--model", "random:tiny-sd15", "--steps", "4",
                       "--json")
    data = json.loads(out)
    floor = data["tolerances"]["min_psnr_db"]
    assert data["tolerances"]["max_rel_l2"] is None and 0 < floor <= 30
    assert data["psnr_db"] is not None and code == (0 if data["passed"] else 1)
    assert data["passed"] == (data["psnr_db"] >= floor and data["e2e_psnr_db"] >= floor)
    code, out, _ = run(capsys, "verify", str(int8_artifact), "--model", "random:tiny-sd15", "--steps", "4")
    assert "(int8)" in out and f"min_psnr_db {floor:g}" in out  # the threshold is stated


def test_int8_bench_through_the_cli(int8_artifact, capsys):
    code, out, _ = run(capsys, "bench", str(int8_artifact), "--iterations", "2", "--warmup", "1", "--json")
    data = json.loads(out)
    assert code == 0 and data["runners"][-1]["p50_ms"] > 0 and data["precision"] == "int8"
    assert data["int8"]["float_mac_share"] == 0 and data["int8"]["kernels"]["QLinearConv"] > 10
    assert read_manifest(int8_artifact).results["latency"]["p50_ms"] == data["p50_ms"]


def test_impossible_gate_fails_with_the_psnr_it_reached(tiny_onnx_fp32, tmp_path):
    source, folder = tiny_onnx_fp32
    spec = build_spec(source.unet.config, precision="int8")
    options = Int8Options(**FAST, min_psnr=150.0, max_float_share=0.0)
    with pytest.raises(CheckFailed, match=r"held-out PSNR \d+\.\d\d dB < --min-psnr 150 dB with 0 of \d+ node "
                                          r"groups float \(0\.0% of MACs; --max-float-share 0\)") as info:
        quantize_onnx(folder / "model.onnx", source.unet, spec, tmp_path, source=source.describe(), options=options)
    assert info.value.exit_code == 1


def quantized_outputs(graph: onnx.GraphProto, op_type: str) -> tuple[int, int]:
    """(nodes of ``op_type`` whose output a QuantizeLinear reads, nodes of ``op_type``)."""
    q_inputs = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    nodes = [n for n in graph.node if n.op_type == op_type]
    return sum(n.output[0] in q_inputs for n in nodes), len(nodes)


@pytest.mark.parametrize("flag,outputs", [(None, ("MatMul", "Gemm")), ("none", ()), ("MatMul", ("MatMul",)),
                                          ("Gemm, MatMul", ("Gemm", "MatMul"))])
def test_int8_float_outputs_flag(flag, outputs):
    import argparse

    options = Int8Options.from_args(argparse.Namespace(precision="int8", int8_float_outputs=flag))
    options.check()
    assert options.float_outputs == outputs and ("float_outputs" in options.given) == (flag is not None)


@pytest.mark.slow
def test_float_outputs_decide_where_quantize_nodes_go_and_which_kernels_run(tiny_onnx_fp32, tmp_path):
    """``float_outputs=()`` puts a QuantizeLinear after every quantized node (ORT then fuses DQ→Softmax→Q into the
    slow QLinearSoftmax); the default leaves MatMul/Gemm outputs float: no QuantizeLinear reads one, Softmax runs
    float, and the output stays as close to fp32 (SD-1.5 student: 35.3 vs 35.2 dB held out)."""
    import onnxruntime as ort

    from laptop_deploy.exporters.int8_graph import executed_ops
    from laptop_deploy.exporters.int8_minmax import calibrate_minmax
    from laptop_deploy.exporters.onnx_int8 import FLOAT_OUTPUT_OPS, preprocess, quantize

    _, folder = tiny_onnx_fp32
    spec = read_manifest(folder).spec
    pre = preprocess(folder / "model.onnx", tmp_path / "pre" / "model.onnx")
    calibrate_minmax(pre, [spec.example_feeds(seed=s) for s in (1, 2)], tmp_path / "cache.json")
    feeds = spec.example_feeds(seed=3)
    reference = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    graphs, errors, kernels = {}, {}, {}
    for label, outputs in (("all", ()), ("default", FLOAT_OUTPUT_OPS)):
        path = quantize(pre, tmp_path / label / "model.onnx", cache=tmp_path / "cache.json", feeds=None,
                        options=Int8Options(float_outputs=outputs))
        graphs[label] = onnx.load(str(path)).graph
        out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
        errors[label] = float(np.abs(out[0] - reference[0]).mean())
        kernels[label] = executed_ops(path, feeds)

    for op in ("MatMul", "Gemm"):
        quantized, count = quantized_outputs(graphs["all"], op)
        assert quantized == count > 0, (op, quantized, count)
        assert quantized_outputs(graphs["default"], op) == (0, count)
    quantized, count = quantized_outputs(graphs["default"], "Conv")
    assert quantized == count > 0  # Conv outputs stay quantized: QLinearConv needs them
    assert kernels["all"].get("QLinearSoftmax", 0) > 0 and "Softmax" not in kernels["all"]
    assert kernels["default"].get("Softmax", 0) == kernels["all"]["QLinearSoftmax"]
    assert "QLinearSoftmax" not in kernels["default"]
    assert errors["default"] < 1.5 * errors["all"], errors  # tiny-sd15, random weights: 0.018 vs 0.017


def test_weights_only_int8_is_quarter_size_and_close(tiny_onnx_fp32, tmp_path):
    source, folder = tiny_onnx_fp32
    spec = build_spec(source.unet.config, precision="int8-weights")
    path, info = quantize_onnx(folder / "model.onnx", source.unet, spec, tmp_path, source=source.describe(),
                               options=Int8Options(**FAST))
    assert info["int8_weight_tensors"] > 40 and info["int8_psnr_db"] >= 30.0
    assert path.stat().st_size < 0.35 * (folder / "model.onnx").stat().st_size
    assert info["int8_kernels"].get("DequantizeLinear", 0) > 0  # int8 weights dequantized at run time


def test_weights_only_round_trip_is_within_half_a_step():
    w = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", 1, [1, 4, 5, 5])],
                                   [onnx.helper.make_tensor_value_info("y", 1, None)],
                                   [onnx.numpy_helper.from_array(w, "w")])
    model, counts = weights_only(onnx.helper.make_model(graph))
    assert counts == {"int8_weight_tensors": 1, "int8_weights": w.size}
    q = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w_int8"))
    scale = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w_scale"))
    assert q.dtype == np.int8 and np.abs(q).max() == 127 and scale.shape == (8,)
    assert np.abs(q * scale[:, None, None, None] - w).max() <= scale.max() / 2 + 1e-7
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "Conv"]


def test_a_bias_matmul_gets_its_output_quantized_so_ort_runs_it_as_int8(tmp_path):
    """DQ→MatMul→Add(bias) with a float MatMul output: ORT's MatMul+Add fusion makes a float Gemm over weights
    dequantized on every call (what the SD-1.5 teacher's 64 bias MatMuls ran as); insert_qdq's pair makes it a
    QLinearMatMul, and the output moves by at most half a quantization step."""
    import onnxruntime as ort
    from onnx import helper

    from laptop_deploy.exporters.int8_graph import bias_matmul_outputs, executed_ops, insert_qdq

    rng = np.random.default_rng(0)
    arrays = {"xs": np.float32(0.05), "xz": np.uint8(128), "w": rng.integers(-127, 128, (64, 32)).astype(np.int8),
              "ws": np.float32(0.01), "wz": np.int8(0), "b": rng.standard_normal(32).astype(np.float32)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="wdq"),
             helper.make_node("MatMul", ["xd", "wd"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 16, 64])],
                              [helper.make_tensor_value_info("y", 1, [1, 16, 32])],
                              [onnx.numpy_helper.from_array(v, k) for k, v in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": rng.standard_normal((1, 16, 64)).astype(np.float32)}
    paths = {label: tmp_path / f"{label}.onnx" for label in ("before", "after")}
    onnx.save(model, str(paths["before"]))
    assert bias_matmul_outputs(model.graph) == ["m"]
    assert executed_ops(paths["before"], feeds).get("Gemm") == 1  # float, weights dequantized per call
    scale = 0.25  # uint8 around 128: [-32, 31.75], wider than these outputs
    assert insert_qdq(model, {"m": (np.float32(scale), np.uint8(128))}) == 1
    onnx.checker.check_model(model)
    onnx.save(model, str(paths["after"]))
    assert bias_matmul_outputs(model.graph) == []
    kernels = executed_ops(paths["after"], feeds)
    assert kernels.get("QLinearMatMul") == 1 and "Gemm" not in kernels and "MatMul" not in kernels
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for p in paths.values())
    assert 0 < np.abs(a - b).max() <= scale / 2 + 1e-5


def test_keep_float_adds_most_sensitive_groups_until_the_gate_passes():
    shares = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}
    gains = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}
    evaluate = lambda kept: 25.0 + sum(gains[g] for g in kept)  # noqa: E731 - PSNR grows as groups turn float
    kept, psnr, log = keep_float(["a", "b", "c", "d"], shares, evaluate, start_db=25.0, min_psnr=30.0,
                                 max_share=0.5)
    assert kept == ["a", "b"] and psnr == 32.0
    assert [e["kept_float"] for e in log] == [None, "a", "b"] and log[-1]["float_mac_share"] == pytest.approx(0.3)
    kept, psnr, _ = keep_float(["a", "b", "c", "d"], shares, evaluate, start_db=25.0, min_psnr=40.0, max_share=0.5)
    assert kept == ["a", "b"] and psnr == 32.0  # c would make 60% of MACs float: stop below the gate
    assert keep_float(["a"], shares, evaluate, start_db=31.0, min_psnr=30.0, max_share=1.0)[0] == []


def test_node_groups_follow_unet_units_and_split_attention_scores():
    assert unit_of("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == "down_blocks.1.attentions.0"
    assert unit_of("mid_block.resnets.1.conv2") == "mid_block.resnets.1"
    assert unit_of("time_embedding.linear_1") == "time_embedding" and unit_of("") == "graph"
    w = onnx.numpy_helper.from_array(np.zeros((4, 4), np.float32), "w")
    nodes = [onnx.helper.make_node("MatMul", ["x", "w"], ["q"], name="/unet/down_blocks.0/attentions.0/to_q/MatMul"),
             onnx.helper.make_node("MatMul", ["q", "k"], ["s"], name="/unet/down_blocks.0/attentions.0/attn/MatMul"),
             onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="/unet/conv_in/Conv"),
             onnx.helper.make_node("Add", ["y", "y"], ["z"], name="/unet/conv_in/Add")]
    graph = onnx.helper.make_graph(nodes, "g", [], [], [w])
    assert node_groups(graph) == {"down_blocks.0.attentions.0": ["/unet/down_blocks.0/attentions.0/to_q/MatMul"],
                                  "down_blocks.0.attentions.0:scores": ["/unet/down_blocks.0/attentions.0/attn/MatMul"],
                                  "conv_in": ["/unet/conv_in/Conv"]}


@pytest.mark.parametrize("extra,message", [
    (["--target", "trt", "--precision", "int8"], "--precision int8 is not supported by --target trt"),
    (["--target", "onnx", "--precision", "int8", "--calib-steps", "1"], "--calib-steps 1: need at least 2"),
    (["--target", "onnx", "--calib-steps", "4"], "--calib-steps: only with --precision int8 or int8-weights"),
    (["--target", "onnx", "--precision", "int8", "--calib-prompts", "/nonexistent"],
     "--calib-prompts /nonexistent: neither a count nor a readable prompt file"),
    (["--target", "onnx", "--precision", "int8", "--max-float-share", "2"], "--max-float-share 2.0: must lie in"),
    (["--target", "onnx", "--precision", "int8", "--calib-method", "kl"], "invalid choice: 'kl'"),
    (["--target", "onnx", "--precision", "int8", "--int8-float-outputs", "Softmax"],
     "--int8-float-outputs Softmax: valid: Conv, MatMul, Gemm or none"),
    (["--target", "onnx", "--int8-float-outputs", "none"], "--int8-float-outputs: only with --precision int8"),
    (["--target", "executorch", "--precision", "int8", "--int8-float-outputs", "MatMul"],
     "--int8-float-outputs chooses ONNX Runtime's int8 kernels: use it with --target onnx or ort-mobile"),
])
def test_bad_int8_options_exit_2_before_loading(capsys, tmp_path, extra, message):
    code, out, err = run(capsys, "export", "--model", "random:tiny-sd15", *extra, "--out", str(tmp_path / "o"))
    assert code == 2 and out == "" and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_gate_keeps_the_most_sensitive_groups_float(tiny_onnx_fp32, tmp_path):
    """The whole loop: scan every group alone, keep the worst float until a gate between the all-int8 PSNR and
    fp32 passes (tiny-sd15's random weights: about 29 dB all-int8)."""
    source, folder = tiny_onnx_fp32
    spec = build_spec(source.unet.config, precision="int8")
    options = Int8Options(**FAST, min_psnr=40.0, max_float_share=0.9)
    path, info = quantize_onnx(folder / "model.onnx", source.unet, spec, tmp_path, source=source.describe(),
                               options=options)
    sensitivity = info["int8_group_sensitivity_db"]
    assert info["int8_gate_log"][0]["psnr_db"] < 40.0 <= info["int8_psnr_db"]
    assert info["int8_kept_float_groups"] == list(sensitivity)[:len(info["int8_kept_float_groups"])]
    assert 0 < info["int8_float_mac_share"] <= 0.9 and info["int8_kept_float_nodes"]
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_preprocess_of_an_external_weights_graph_keeps_the_weights_file_and_the_function(tiny_onnx_fp32,
                                                                                        tmp_path):
    """Graphs above 2 GiB (SD-1.5) keep their weights in model.onnx.data; preprocess must infer shapes on the graph
    alone (quant_pre_process on SD-1.5 was OOM-killed) and leave a model that computes the same thing."""
    import onnxruntime as ort

    from laptop_deploy.exporters.onnx_files import DATA_FILE, MODEL_FILE
    from laptop_deploy.exporters.onnx_int8 import preprocess

    _, folder = tiny_onnx_fp32
    model = onnx.load(str(folder / MODEL_FILE))
    src = tmp_path / "fp32" / MODEL_FILE
    src.parent.mkdir()
    onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True, location=DATA_FILE,
                    size_threshold=0)
    out = preprocess(src, tmp_path / "pre" / MODEL_FILE)
    assert (out.parent / DATA_FILE).read_bytes() == (src.parent / DATA_FILE).read_bytes()
    graph = onnx.load(str(out), load_external_data=False).graph
    assert len(graph.value_info) > 0, "shape inference ran"
    assert len({n.name for n in graph.node}) == len(graph.node) and all(n.name for n in graph.node)
    assert out.stat().st_size < (out.parent / DATA_FILE).stat().st_size / 10, "the graph file holds no weights"
    onnx.load(str(out))  # what quantize_static does: onnx's external-data loader accepts the layout
    feeds = read_manifest(folder).spec.example_feeds(seed=3)
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0] for p in (src, out))
    np.testing.assert_array_equal(a, b)


def test_own_minmax_calibration_writes_the_cache_ort_would(tiny_onnx_fp32, tmp_path):
    """calibrate_minmax (one session, weights never copied; what SD-1.5 needs on 24 GB) must produce the ranges
    ORT's own MinMax calibrator produces on the same (external-weights) graph: the same tensors, the same min/max."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, load_tensors_data

    from laptop_deploy.exporters.int8_graph import QUANT_OPS
    from laptop_deploy.exporters.int8_minmax import calibrate_minmax
    from laptop_deploy.exporters.onnx_files import DATA_FILE, MODEL_FILE
    from laptop_deploy.exporters.onnx_int8 import _Reader, preprocess

    _, folder = tiny_onnx_fp32
    spec = read_manifest(folder).spec
    feeds = [spec.example_feeds(seed=s) for s in (1, 2)]
    src = tmp_path / "ext" / MODEL_FILE
    src.parent.mkdir()
    onnx.save_model(onnx.load(str(folder / MODEL_FILE)), str(src), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=0)
    external = preprocess(src, tmp_path / "ext-pre" / MODEL_FILE)
    count = calibrate_minmax(external, feeds, tmp_path / "ours.json")
    ours = load_tensors_data(tmp_path / "ours.json")
    calibrator = create_calibrator(external, list(QUANT_OPS), augmented_model_path=str(tmp_path / "aug.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)
    calibrator.collect_data(_Reader(feeds))
    theirs = calibrator.compute_data()
    assert sorted(ours.keys()) == sorted(theirs.keys()) and count == len(list(theirs.keys())) > 50
    for name in theirs.keys():
        np.testing.assert_allclose(ours[name].range_value, theirs[name].range_value, rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    assert sorted(p.name for p in external.parent.iterdir()) == [MODEL_FILE, DATA_FILE], "augmented graph removed"
    # an external-weights graph skips ORT's pre-quantization MatMul+Add fusion: its bias MatMuls keep a quantized
    # output (quantize -> requantize_bias_matmuls), so ORT runs none of them as a float Gemm
    from laptop_deploy.exporters.int8_graph import bias_matmul_outputs, executed_ops
    from laptop_deploy.exporters.onnx_int8 import quantize

    assert bias_matmul_outputs(onnx.load(str(external), load_external_data=False).graph) == []  # not quantized yet
    path = quantize(external, tmp_path / "q" / MODEL_FILE, cache=tmp_path / "ours.json", feeds=None,
                    options=Int8Options())
    graph = onnx.load(str(path), load_external_data=False).graph
    assert bias_matmul_outputs(graph) == [] and sum(n.op_type == "MatMul" for n in graph.node) > 10
    kernels = executed_ops(path, feeds[0])
    assert "Gemm" not in kernels and "MatMul" not in kernels and kernels.get("QLinearMatMul", 0) > 5, kernels
