"""ExecuTorch app bundles: ``export --pipeline --target executorch``, ``generate`` and ``verify BUNDLE`` on them.

Option errors run everywhere (no executorch needed: they exit 2 before the package is imported; a missing package
names the extra). The bundle itself needs the ``[executorch]`` extra and is ``slow``: lowering the toy U-Net to
XNNPACK takes minutes on two cores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy_fixtures import assert_exit_2, torch_threads

from laptop_deploy.cli.main import main

PROMPT = "a red circle at the top left"


def test_executorch_bundle_options_exit_2(tmp_path, capsys):
    out = tmp_path / "b"
    base = ["export", "--pipeline", "--model", "toy", "--target", "executorch", "--out", str(out)]
    assert_exit_2(capsys, base + ["--precision", "fp16"], "ExecuTorch bundles are fp32")
    assert_exit_2(capsys, base + ["--attention-slice", "4"], "not --target executorch")
    assert not out.exists()


def test_missing_executorch_names_the_extra(tmp_path, capsys, monkeypatch):
    """With `import executorch` failing (None in sys.modules), the verb exits 2 naming the extra, writing nothing."""
    monkeypatch.setitem(sys.modules, "executorch", None)
    monkeypatch.delitem(sys.modules, "laptop_deploy.exporters.executorch", raising=False)
    out = tmp_path / "b"
    assert_exit_2(capsys, ["export", "--pipeline", "--model", "toy", "--target", "executorch", "--out", str(out)],
                  "pip install 'laptop-deploy[executorch]'")
    assert not out.exists()


# --- the real thing (the [executorch] extra; slow) ----------------------------------------------------------------

@pytest.fixture(scope="module")
def et_bundle(tmp_path_factory) -> Path:
    pytest.importorskip("executorch", reason="ExecuTorch bundles need the [executorch] extra")
    out = tmp_path_factory.mktemp("etbundle") / "toy"
    with torch_threads(1):
        assert main(["export", "--pipeline", "--model", "toy", "--target", "executorch", "--out", str(out),
                     "--json"]) == 0
    return out


@pytest.mark.slow
def test_executorch_bundle_layout_and_checks(et_bundle):
    manifest = json.loads((et_bundle / "manifest.json").read_text())
    assert manifest["target"] == "executorch" and manifest["image"]["fixed"] is True
    assert not (et_bundle / "model_index.json").exists()  # diffusers loads no .pte
    assert set(manifest["parts"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    for name, part in manifest["parts"].items():
        assert part["model_file"] == f"{name}/model.pte" and (et_bundle / part["model_file"]).is_file()
        own = json.loads((et_bundle / name / "manifest.json").read_text())  # each part a single artifact too
        assert own["target"] == "executorch" and own["export"]["bundle_part"] == name
        for tensor in part["inputs"] + part["outputs"]:  # batch is the only dynamic axis
            assert tensor["shape"][0] == "batch" and all(isinstance(d, int) for d in tensor["shape"][1:])
        # checked at batch 1 and 2 in ExecuTorch's runtime, within the .pte gate of PyTorch's own fp32 noise
        assert [row["batch"] for row in part["pte_parity"]] == [1, 2]
        assert all(row["factor_rel_l2"] <= row["gate"][0] and row["rel_l2"] < 1e-5 for row in part["pte_parity"])
    assert manifest["parts"]["text_encoder"]["inputs"][0]["dtype"] == "int32"
    assert manifest["parts"]["unet"]["delegation"]["compute_delegated_share"] == 1.0


@pytest.mark.slow
def test_executorch_bundle_generates_and_verifies(et_bundle, tmp_path, capsys):
    out = tmp_path / "image.png"
    args = ["generate", str(et_bundle), "--prompt", PROMPT, "--steps", "4", "--guidance", "4", "--seed", "1"]
    assert main(args + ["--out", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["target"] == "executorch" and data["calls"]["unet"] == 4 and data["calls"]["text_encoder"] == 2
    seq = tmp_path / "seq.png"  # --sequential: the guidance pair as two batch-1 calls of the same program
    assert main(args + ["--sequential", "--out", str(seq), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["calls"]["unet"] == 8
    from PIL import Image

    first, second = (np.asarray(Image.open(p), np.int16) for p in (out, seq))
    assert first.shape == (32, 32, 3) and np.abs(first - second).max() <= 1
    assert_exit_2(capsys, args + ["--height", "64", "--out", str(tmp_path / "big.png")], "exported at one size")
    with torch_threads(1):
        code = main(["verify", str(et_bundle), "--prompt", PROMPT, "--steps", "6", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["passed"], result["failures"]
    assert all(p["judged_by"] == "calibrated gate" for p in result["parts"].values())
    assert result["cases"][0]["psnr_db"] >= 40.0


@pytest.mark.slow
def test_the_pte_check_fails_a_part_with_one_weight_off(et_bundle):
    """The export's own check (the gate every part passed above) against a module with one layer norm scaled by
    1.01: the .pte no longer matches it, and the check says so (exit 1)."""
    from laptop_deploy.deploy.bundle import resolve_sources
    from laptop_deploy.deploy.bundle_executorch import check_pte
    from laptop_deploy.deploy.bundle_parts import part_spec, text_encoder_wrapper
    from laptop_deploy.errors import CheckFailed

    manifest = json.loads((et_bundle / "manifest.json").read_text())
    encoder = resolve_sources("toy").parts.part("text_encoder").eval()
    wrapper = text_encoder_wrapper(encoder, hidden_states=False)
    spec = part_spec(manifest["parts"]["text_encoder"])
    check_pte(et_bundle / "text_encoder" / "model.pte", wrapper, spec, case="text_encoder")  # the right module
    with torch.no_grad():
        encoder.final_layer_norm.weight.mul_(1.01)
    with pytest.raises(CheckFailed, match="differs from PyTorch"):
        check_pte(et_bundle / "text_encoder" / "model.pte", wrapper, spec, case="text_encoder")
