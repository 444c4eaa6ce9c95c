"""Intra-layer splits reproduce the unsplit stage: spatial stripes, output channels, attention heads / MLP columns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fleetpipe.models import zoo
from fleetpipe.models.onnx_graph import load_onnx
from fleetpipe.models.slicing import make_session, run_model, slice_model
from fleetpipe.models.split import SplitError, layer_split_info, split_model, split_stage, verify_split

TINY = {
    "resnet18": {"width": 0.125, "resolution": 32},
    "resnet50": {"width": 0.0625, "resolution": 32},
    "vit": {"resolution": 16, "patch": 4, "dim": 32, "depth": 2, "heads": 4},
    "vgg16": {"width": 0.0625, "resolution": 32, "fc": 64},
}
TOL = 1e-4


def _stage(name: str, first: int, last: int):
    model = zoo.build(name, **TINY[name])
    graph = load_onnx(model)
    rng = np.random.default_rng(0)
    env = {"input": rng.standard_normal(zoo.input_shape(name, **TINY[name])).astype(np.float32)}
    if first > 0:
        env.update(run_model(make_session(slice_model(model, graph, 0, first - 1)), env))
    stage = slice_model(model, graph, first, last)
    return stage, {n: env[n] for n in graph.inputs_of(first)}


@pytest.mark.parametrize("shares", [2, [0.5, 0.3, 0.2], 4])
def test_spatial_resnet18_fused_stem_and_blocks(shares) -> None:
    stage, feeds = _stage("resnet18", 0, 3)  # stem conv+pool, two basic blocks, first downsampling block
    split = split_model(stage, "spatial", shares)
    assert all(p.inputs for p in split.parts)
    rows = [p.inputs[0].stop - p.inputs[0].start for p in split.parts]
    assert sum(rows) > 32  # halos overlap
    assert split.parts[0].inputs[0].start == 0 and split.parts[-1].inputs[0].stop == 32
    assert verify_split(stage, split, feeds) < TOL


def test_spatial_resnet50_bottleneck_with_downsample() -> None:
    stage, feeds = _stage("resnet50", 4, 5)  # layer2.0 (strided, downsample branch) + layer2.1
    split = split_model(stage, "spatial", [0.6, 0.4])
    assert verify_split(stage, split, feeds) < TOL
    assert verify_split(stage, split, feeds, merge_with_onnx=False) < TOL


def test_channel_split_conv_and_gemm() -> None:
    stage, feeds = _stage("vgg16", 0, 0)
    split = split_model(stage, "channel", 3)
    assert [m.kind for m in split.merges] == ["concat"] and split.merges[0].axis == 1
    assert verify_split(stage, split, feeds) < TOL
    head, hfeeds = _stage("resnet50", 17, 17)
    split = split_model(head, "channel", [0.7, 0.3])
    assert split.merges[0].axis == 1
    assert verify_split(head, split, hfeeds) < TOL


def test_channel_refuses_conv_after_split_conv_tensor_accepts_pointwise_pair() -> None:
    stage, _ = _stage("resnet50", 1, 1)
    with pytest.raises(SplitError):
        split_model(stage, "channel", 2)
    with pytest.raises(SplitError):  # Relu on a partial sum inside the block
        split_model(stage, "tensor", 2)


@pytest.mark.parametrize("layer", [1, 2])
@pytest.mark.parametrize("parts", [2, 4])
def test_tensor_parallel_vit_attention_and_mlp(layer: int, parts: int) -> None:
    stage, feeds = _stage("vit", layer, layer)  # 1: attention block, 2: MLP block
    split = split_model(stage, "tensor", parts)
    assert [m.kind for m in split.merges] == ["sum"]
    assert verify_split(stage, split, feeds) < TOL


def test_attention_split_keeps_whole_heads() -> None:
    stage, _ = _stage("vit", 1, 1)
    with pytest.raises(SplitError, match="units of 8"):
        split_model(stage, "tensor", 5)  # 4 heads of 8 cannot go to 5 devices


def test_spatial_refuses_row_mixing_ops() -> None:
    stage, _ = _stage("resnet50", 16, 16)  # ends in GlobalAveragePool + Flatten
    with pytest.raises(SplitError):
        split_model(stage, "spatial", 2)


def test_split_stage_and_layer_info() -> None:
    model = zoo.build("resnet18", **TINY["resnet18"])
    graph = load_onnx(model)
    sp = split_stage(model, graph, 1, 2, "spatial", 2)
    assert len(sp.parts) == 2
    info = layer_split_info(model, graph)
    assert "spatial" in info[1].kinds and info[1].halo_rows > 0 and info[1].in_rows == 8
    assert info[-1].kinds == ("channel", "tensor")


_WORKER = """
import sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = 1
sess = ort.InferenceSession(open(sys.argv[1], "rb").read(), so, providers=["CPUExecutionProvider"])
feeds = dict(np.load(sys.argv[2]))
outs = sess.run(None, feeds)
np.savez(sys.argv[3], **{o.name: v for o, v in zip(sess.get_outputs(), outs)})
"""


def test_parts_in_separate_processes_reproduce_the_stage(tmp_path: Path) -> None:
    stage, feeds = _stage("resnet18", 1, 2)
    split = split_model(stage, "spatial", 2)
    procs = []
    for i, (part, pf) in enumerate(zip(split.parts, split.scatter(feeds), strict=True)):
        (tmp_path / f"p{i}.onnx").write_bytes(part.model)
        np.savez(tmp_path / f"in{i}.npz", **pf)
        args = [sys.executable, "-c", _WORKER, str(tmp_path / f"p{i}.onnx"), str(tmp_path / f"in{i}.npz"),
                str(tmp_path / f"out{i}.npz")]
        procs.append(subprocess.Popen(args))
    for proc in procs:
        assert proc.wait(60) == 0
    outs = []
    for i in range(len(split.parts)):
        with np.load(tmp_path / f"out{i}.npz") as data:
            outs.append({k: data[k] for k in data.files})
    merged = split.merge(outs)
    whole = run_model(make_session(stage), feeds)
    for name, ref in whole.items():
        assert np.max(np.abs(merged[name] - ref)) < TOL
