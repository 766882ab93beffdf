"""ExportSpec: names, shapes, dtypes and dynamic axes from the U-Net config; the wrapper the exporters trace."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from laptop_deploy.errors import LaptopDeployError
from laptop_deploy.deploy.spec import ExportSpec, SpecError, build_spec, feeds_from_unet_kwargs, torch_inputs, wrap_unet


def test_sd15_static_spec_from_config(make_source):
    spec = build_spec(make_source("random:tiny-sd15").unet.config, batch=2, height=24, width=32)
    assert spec.input_names == ["sample", "timestep", "encoder_hidden_states"]
    assert spec.output_names == ["out_sample"]
    shapes = {t.name: t.shape for t in (*spec.inputs, *spec.outputs)}
    assert shapes == {"sample": (2, 4, 24, 32), "timestep": (2,), "encoder_hidden_states": (2, 77, 32),
                      "out_sample": (2, 4, 24, 32)}
    assert {t.dtype for t in spec.inputs} == {"float32"} and spec.dynamic_shapes() is None
    assert spec.downsample == 8 and not spec.sdxl


def test_sdxl_dynamic_fp16_spec():
    from laptop_deploy.models.sources import resolve_model

    config = resolve_model("random:sdxl", materialize=False).unet.config  # the full-size config, no weights
    spec = build_spec(config, dynamic=True, precision="fp16")
    by_name = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    assert spec.input_names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert by_name["text_embeds"].shape == ("batch", 1280) and by_name["time_ids"].shape == ("batch", 6)
    assert by_name["sample"].shape == ("batch", 4, "height", "width") and spec.height == 128
    # timestep and time_ids feed sinusoidal embeddings: float32 in every precision
    assert {n: t.dtype for n, t in by_name.items()} == {
        "sample": "float16", "timestep": "float32", "encoder_hidden_states": "float16", "text_embeds": "float16",
        "time_ids": "float32", "out_sample": "float16"}
    assert spec.dynamic_axes()["out_sample"] == {0: "batch", 2: "height", 3: "width"}
    assert spec.dynamic_shapes() == {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
                                     "encoder_hidden_states": {0: "batch"}, "text_embeds": {0: "batch"},
                                     "time_ids": {0: "batch"}}
    assert spec.with_precision("fp32") == build_spec(config, dynamic=True)


@pytest.mark.parametrize("height,width,message", [
    (20, 16, "latent height 20 is not a positive multiple of 8 (this U-Net downsamples 3 times); "
             "nearest valid: 16 or 24"),
    (16, 4, "latent width 4 is not a positive multiple of 8 (this U-Net downsamples 3 times); nearest valid: 8"),
])
def test_invalid_latent_size_names_the_nearest_valid(make_source, height, width, message):
    with pytest.raises(LaptopDeployError) as info:
        build_spec(make_source("random:tiny-sd15").unet.config, height=height, width=width)
    assert str(info.value) == message


def test_invalid_precision_and_batch(make_source):
    config = make_source("random:tiny-sd15").unet.config
    with pytest.raises(SpecError, match="precision 'int4' is not supported; valid: fp32, fp16, int8, int8-weights"):
        build_spec(config, precision="int4")
    with pytest.raises(SpecError, match="batch 0 must be at least 1"):
        build_spec(config, batch=0)


def test_example_feeds_cover_the_timestep_range_and_are_seeded(make_source):
    spec = build_spec(make_source("random:tiny-sdxl").unet.config, dynamic=True, precision="fp16")
    feeds = spec.example_feeds(batch=3, height=32, width=48, seed=5)
    assert feeds["sample"].shape == (3, 4, 32, 48) and feeds["sample"].dtype == np.float16
    assert feeds["timestep"].tolist() == [999.0, 500.0, 1.0] and feeds["timestep"].dtype == np.float32
    assert feeds["time_ids"].tolist()[0] == [256.0, 384.0, 0.0, 0.0, 256.0, 384.0]
    again = spec.example_feeds(batch=3, height=32, width=48, seed=5)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)
    assert not np.array_equal(feeds["sample"], spec.example_feeds(batch=3, height=32, width=48, seed=6)["sample"])
    spec.check_feeds(feeds)
    static = build_spec(make_source("random:tiny-sd15").unet.config)
    with pytest.raises(SpecError, match="static spec takes batch 1, latent 16x16; asked for batch 2, 16x16"):
        static.example_feeds(batch=2)


def test_check_feeds_reports_every_problem(make_source):
    spec = build_spec(make_source("random:tiny-sd15").unet.config)
    feeds = spec.example_feeds()
    feeds["sample"] = feeds["sample"][:, :, :8]
    feeds["encoder_hidden_states"] = feeds["encoder_hidden_states"].astype(np.float64)
    del feeds["timestep"]
    feeds["extra"] = np.zeros(1, np.float32)
    with pytest.raises(SpecError) as info:
        spec.check_feeds(feeds)
    message = str(info.value)
    assert "missing input 'timestep'" in message and "unexpected input 'extra'" in message
    assert "sample: axis 2 is 8, expected 16" in message
    assert "encoder_hidden_states: dtype float64, expected float32" in message


def test_dynamic_spec_rejects_latent_sizes_the_unet_cannot_take(make_source):
    spec = build_spec(make_source("random:tiny-sd15").unet.config, dynamic=True)
    feeds = spec.example_feeds(height=16, width=16)
    feeds["sample"] = np.zeros((1, 4, 16, 20), np.float32)
    with pytest.raises(SpecError, match="sample width 20 is not a multiple of 8"):
        spec.check_feeds(feeds)


def test_spec_round_trips_through_a_dict(make_source):
    spec = build_spec(make_source("random:tiny-sdxl").unet.config, dynamic=True, precision="fp16")
    assert ExportSpec.from_dict(spec.as_dict()) == spec
    with pytest.raises(SpecError, match="malformed I/O spec"):
        ExportSpec.from_dict({"inputs": []})


def test_wrapper_arguments_are_the_spec_inputs_and_it_computes_the_unet(tiny_spec, make_source, inputs_for):
    unet = make_source(tiny_spec).unet
    spec = build_spec(unet.config, batch=2)
    wrapper = wrap_unet(unet, spec)
    assert list(inspect.signature(wrapper.forward).parameters) == spec.input_names
    kwargs = inputs_for(unet, batch=2)
    feeds = feeds_from_unet_kwargs(spec, kwargs)
    spec.check_feeds(feeds)
    with torch.no_grad():
        expected = unet(**kwargs).sample
        got = wrapper(*torch_inputs(spec, feeds))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
