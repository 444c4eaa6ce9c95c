"""A model whose 8-bit activations clearly exceed 1 % relative error at its cuts, and a classifier.

``outlier_map``: conv -> relu -> a per-channel gain where one channel is 1000x the others (an activation
with a huge dynamic range, as detectors' feature maps have) -> conv -> relu -> conv that reads the small
channels -> sigmoid probability map. Per-tensor 8-bit quantization of the middle activations rounds the
small channels to a few steps, so the map moves far more than 1 %; float16 keeps it exact to ~1e-3.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def outlier_map(size: int = 16, seed: int = 0, *, channels: int = 8, depth: int = 0) -> Any:
    """``x (1, 3, size, size) -> prob (1, 1, size, size)`` with 8-bit-hostile activations between layers.

    ``depth`` more 3x3 conv + relu layers (the outlier channel kept apart) make it heavy enough to pipeline.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c = channels
    w1 = rng.standard_normal((c, 3, 3, 3)).astype(np.float32) * 0.5
    gain = np.ones((1, c, 1, 1), np.float32)
    gain[0, 0] = 1000.0
    w2 = (np.eye(c, dtype=np.float32)[:, :, None, None] + 0.05 * rng.standard_normal((c, c, 1, 1))).astype(np.float32)
    w2[:, 0] = 0.0
    w2[0, 0] = 1.0  # the outlier channel passes through on its own
    w3 = rng.standard_normal((1, c, 3, 3)).astype(np.float32)
    w3[:, 0] = 1e-4  # the map reads the small channels; the outlier one barely
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (gain, "gain"), (w2, "w2"), (w3, "w3"))]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Mul", ["r1", "gain"], ["g1"], name="gain1"),
        helper.make_node("Conv", ["g1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2_0"], name="relu2"),
    ]
    for i in range(depth):  # identity at the centre tap plus a little mixing among the small channels
        w = np.zeros((c, c, 3, 3), np.float32)
        w[:, :, 1, 1] = np.eye(c)
        w[1:, 1:] += (0.02 / c) * rng.standard_normal((c - 1, c - 1, 3, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"wd{i}"))
        nodes += [helper.make_node("Conv", [f"r2_{i}", f"wd{i}"], [f"cd{i}"], name=f"deep{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"cd{i}"], [f"r2_{i + 1}"], name=f"deeprelu{i}")]
    nodes += [
        helper.make_node("Conv", [f"r2_{depth}", "w3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c3"], ["prob"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes, "outlier_map",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 1, size, size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
