"""Model zoo built in code with deterministic weights (no downloads), plus the shipped digits classifier.

Every CNN takes ``width`` (channel multiplier), ``resolution`` and ``num_classes``; the ViT takes
``resolution``, ``patch``, ``dim``, ``depth``, ``heads``. Batch norm is folded into the conv weights,
weights are He-initialised and residual branches are scaled down so activations stay finite and
non-degenerate at any depth. ``build("digits")`` loads the model trained by ``train_digits.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import onnx

__all__ = ["DATA_DIR", "OPSET", "build", "digits_test_set", "input_shape", "names"]

OPSET = 17
DATA_DIR = Path(__file__).parent / "data"
DIGITS_ONNX = DATA_DIR / "digits_mlp.onnx"
DIGITS_NPZ = DATA_DIR / "digits_mlp.npz"


def names() -> list[str]:
    """Names accepted by ``build``."""
    return sorted([*_BUILDERS, "digits"])


def build(name: str, **kw: Any) -> onnx.ModelProto:
    """Build (or, for ``digits``, load) a zoo model; keyword arguments tune its size."""
    if name == "digits":
        import onnx

        if kw:
            raise TypeError(f"digits takes no options, got {sorted(kw)}")
        return onnx.load(str(DIGITS_ONNX))
    if name not in _BUILDERS:
        raise KeyError(f"unknown zoo model {name!r}; known: {names()}")
    return _BUILDERS[name](**kw)


def input_shape(name: str, **kw: Any) -> tuple[int, ...]:
    """Input shape of ``build(name, **kw)`` (batch first)."""
    batch = int(kw.get("batch", 1))
    if name == "digits":
        return (batch, 64)
    if name not in _BUILDERS:
        raise KeyError(f"unknown zoo model {name!r}; known: {names()}")
    res = int(kw.get("resolution", {"vit": 32, "wideconv": 128}.get(name, 224)))
    return (batch, int(kw.get("channels", 16)) if name == "wideconv" else 3, res, res)


def digits_test_set() -> tuple[np.ndarray, np.ndarray]:
    """``(x_test float32 [N,64] scaled to 0..1, y_test int64 [N])`` of the shipped digits model."""
    import numpy as np

    with np.load(DIGITS_NPZ) as data:
        return data["x_test"].astype(np.float32), data["y_test"].astype(np.int64)


# --- builders --------------------------------------------------------------------------------------


class _Net:
    """Tiny graph builder: named nodes, seeded weights, folded batch norm."""

    def __init__(self, name: str, seed: int) -> None:
        import numpy as np

        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.count: dict[str, int] = {}

    def _uid(self, scope: str, op: str) -> str:
        key = f"{scope}/{op}"
        k = self.count.get(key, 0)
        self.count[key] = k + 1
        return key if k == 0 else f"{key}_{k}"

    def const(self, scope: str, label: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self._uid(scope, label)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, scope: str, op: str, inputs: list[str], **attrs: Any) -> str:
        from onnx import helper

        name = self._uid(scope, op)
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv(
        self,
        scope: str,
        x: str,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        group: int = 1,
        gain: float = 2.0,
        pad: int | None = None,
    ) -> str:
        import numpy as np

        fan_in = cin // group * k * k
        w = (self.rng.standard_normal((cout, cin // group, k, k)) * math.sqrt(gain / fan_in)).astype(
            np.float32
        )
        b = (self.rng.standard_normal(cout) * 0.05).astype(np.float32)
        p = k // 2 if pad is None else pad
        return self.op(
            scope,
            "Conv",
            [x, self.const(scope, "W", w), self.const(scope, "B", b)],
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[p] * 4,
            group=group,
        )

    def conv_relu(
        self, scope: str, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1
    ) -> str:
        return self.op(scope, "Relu", [self.conv(scope, x, cin, cout, k, stride, group)])

    def relu6(self, scope: str, x: str) -> str:
        import numpy as np

        lo = self.const(scope, "min", np.array(0.0, np.float32))
        hi = self.const(scope, "max", np.array(6.0, np.float32))
        return self.op(scope, "Clip", [x, lo, hi])

    def linear(self, scope: str, x: str, din: int, dout: int, gain: float = 1.0) -> str:
        import numpy as np

        w = self.rng.standard_normal((din, dout)) * math.sqrt(gain / din)
        b = self.rng.standard_normal(dout) * 0.02
        return self.op(
            scope,
            "Gemm",
            [x, self.const(scope, "W", w.astype(np.float32)), self.const(scope, "B", b.astype(np.float32))],
        )

    def head(self, x: str, c: int, num_classes: int) -> str:
        pooled = self.op("head", "GlobalAveragePool", [x])
        flat = self.op("head", "Flatten", [pooled], axis=1)
        return self.linear("head", flat, c, num_classes)

    def model(self, x_shape: tuple[int, ...], out: str, out_shape: tuple[int, ...]) -> onnx.ModelProto:
        import onnx
        from onnx import helper

        TP = onnx.TensorProto
        graph = helper.make_graph(
            self.nodes,
            self.name,
            [helper.make_tensor_value_info("input", TP.FLOAT, list(x_shape))],
            [helper.make_tensor_value_info(out, TP.FLOAT, list(out_shape))],
            initializer=self.inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fleetpipe.models.zoo"
        )
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def _ch(c: float, width: float, divisor: int = 4) -> int:
    return max(divisor, round(c * width / divisor) * divisor)


def _resnet(
    name: str,
    bottleneck: bool,
    blocks: tuple[int, ...],
    width: float,
    resolution: int,
    num_classes: int,
    seed: int,
    batch: int,
) -> onnx.ModelProto:
    net = _Net(name, seed)
    c = _ch(64, width)
    x = net.conv_relu("stem", "input", 3, c, 7, 2)
    x = net.op("stem", "MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    expansion = 4 if bottleneck else 1
    for stage, n in enumerate(blocks):
        mid = _ch(64 * 2**stage, width)
        cout = mid * expansion
        for i in range(n):
            s = f"layer{stage + 1}.{i}"
            stride = 2 if i == 0 and stage > 0 else 1
            if bottleneck:
                y = net.conv_relu(s + "/conv1", x, c, mid, 1)
                y = net.conv_relu(s + "/conv2", y, mid, mid, 3, stride)
                y = net.conv(s + "/conv3", y, mid, cout, 1, gain=0.2)
            else:
                y = net.conv_relu(s + "/conv1", x, c, mid, 3, stride)
                y = net.conv(s + "/conv2", y, mid, cout, 3, gain=0.2)
            short = (
                net.conv(s + "/downsample", x, c, cout, 1, stride, gain=1.0)
                if stride != 1 or c != cout
                else x
            )
            x = net.op(s, "Relu", [net.op(s, "Add", [y, short])])
            c = cout
    out = net.head(x, c, num_classes)
    return net.model((batch, 3, resolution, resolution), out, (batch, num_classes))


def resnet18(
    width: float = 1.0,
    resolution: int = 224,
    num_classes: int = 1000,
    seed: int = 0,
    batch: int = 1,
    blocks: tuple[int, ...] = (2, 2, 2, 2),
) -> onnx.ModelProto:
    """ResNet-18 (basic blocks)."""
    return _resnet("resnet18", False, tuple(blocks), width, resolution, num_classes, seed, batch)


def resnet50(
    width: float = 1.0,
    resolution: int = 224,
    num_classes: int = 1000,
    seed: int = 0,
    batch: int = 1,
    blocks: tuple[int, ...] = (3, 4, 6, 3),
) -> onnx.ModelProto:
    """ResNet-50 (bottleneck blocks)."""
    return _resnet("resnet50", True, tuple(blocks), width, resolution, num_classes, seed, batch)


def vgg16(
    width: float = 1.0,
    resolution: int = 224,
    num_classes: int = 1000,
    seed: int = 0,
    batch: int = 1,
    fc: int = 4096,
) -> onnx.ModelProto:
    """VGG-16: 13 convs in 5 stages, then 3 fully connected layers."""
    net = _Net("vgg16", seed)
    cfg = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]
    x, c, r = "input", 3, resolution
    for stage, (ch, n) in enumerate(cfg):
        for i in range(n):
            x = net.conv_relu(f"features.{stage + 1}.{i}", x, c, _ch(ch, width), 3)
            c = _ch(ch, width)
        x = net.op(f"features.{stage + 1}", "MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        r //= 2
    x = net.op("classifier", "Flatten", [x], axis=1)
    hidden = _ch(fc, width)
    x = net.op("classifier.fc1", "Relu", [net.linear("classifier.fc1", x, c * r * r, hidden, 2.0)])
    x = net.op("classifier.fc2", "Relu", [net.linear("classifier.fc2", x, hidden, hidden, 2.0)])
    out = net.linear("classifier.fc3", x, hidden, num_classes)
    return net.model((batch, 3, resolution, resolution), out, (batch, num_classes))


def mobilenetv2(
    width: float = 1.0, resolution: int = 224, num_classes: int = 1000, seed: int = 0, batch: int = 1
) -> onnx.ModelProto:
    """MobileNetV2: inverted residuals with depthwise convs and ReLU6."""
    net = _Net("mobilenetv2", seed)
    cfg = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]
    c = _ch(32, width, 8)
    x = net.relu6("stem", net.conv("stem", "input", 3, c, 3, 2))
    idx = 0
    for t, ch, n, s in cfg:
        cout = _ch(ch, width, 8)
        for i in range(n):
            scope = f"features.{idx}"
            stride = s if i == 0 else 1
            hidden = c * t
            y = x
            if t != 1:
                y = net.relu6(scope + "/expand", net.conv(scope + "/expand", y, c, hidden, 1))
            y = net.relu6(scope + "/dw", net.conv(scope + "/dw", y, hidden, hidden, 3, stride, group=hidden))
            residual = stride == 1 and c == cout
            y = net.conv(scope + "/project", y, hidden, cout, 1, gain=0.3 if residual else 1.0)
            x = net.op(scope, "Add", [x, y]) if residual else y
            c = cout
            idx += 1
    last = _ch(1280, max(width, 1.0), 8) if width >= 1.0 else _ch(1280, width, 8)
    x = net.relu6("conv_last", net.conv("conv_last", x, c, last, 1))
    out = net.head(x, last, num_classes)
    return net.model((batch, 3, resolution, resolution), out, (batch, num_classes))


def inception(
    width: float = 1.0,
    resolution: int = 224,
    num_classes: int = 1000,
    seed: int = 0,
    batch: int = 1,
    blocks: int = 4,
) -> onnx.ModelProto:
    """Inception-style branchy CNN; the file order interleaves the four branches (a poor linearisation)."""
    net = _Net("inception", seed)
    c = _ch(64, width)
    x = net.conv_relu("stem", "input", 3, c, 7, 2)
    x = net.op("stem", "MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    for b in range(blocks):
        s = f"mixed{b}"
        b1, b2, b3 = _ch(64, width), _ch(96, width), _ch(32, width)
        # Emit the branches breadth-first: every branch's first op, then the second ops, ...
        p1 = net.conv_relu(s + "/b1x1", x, c, b1, 1)
        p2 = net.conv_relu(s + "/b3x3_reduce", x, c, b2 // 2, 1)
        p3 = net.conv_relu(s + "/b5x5_reduce", x, c, b3 // 2, 1)
        p4 = net.op(s + "/pool", "MaxPool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
        p2 = net.conv_relu(s + "/b3x3", p2, b2 // 2, b2, 3)
        p3 = net.conv_relu(s + "/b5x5_a", p3, b3 // 2, b3, 3)
        p4 = net.conv_relu(s + "/pool_proj", p4, c, b3, 1)
        p3 = net.conv_relu(s + "/b5x5_b", p3, b3, b3, 3)
        x = net.op(s, "Concat", [p1, p2, p3, p4], axis=1)
        c = b1 + b2 + b3 + b3
        if b % 2 == 1 and b != blocks - 1:
            x = net.op(s + "/reduce", "MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    out = net.head(x, c, num_classes)
    return net.model((batch, 3, resolution, resolution), out, (batch, num_classes))


def vit(
    resolution: int = 32,
    patch: int = 4,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: int = 4,
    num_classes: int = 10,
    seed: int = 0,
    batch: int = 1,
) -> onnx.ModelProto:
    """Small ViT: patch embedding, ``depth`` pre-norm encoder blocks (MHA + MLP), class-token head."""
    import numpy as np

    if resolution % patch or dim % heads:
        raise ValueError("resolution must be a multiple of patch, dim a multiple of heads")
    net = _Net("vit", seed)
    tokens = (resolution // patch) ** 2 + 1
    dh = dim // heads
    f32 = np.float32
    x = net.conv("patch_embed", "input", 3, dim, patch, patch, gain=1.0, pad=0)
    x = net.op("patch_embed", "Reshape", [x, net.const("patch_embed", "shape", np.array([batch, dim, -1]))])
    x = net.op("patch_embed", "Transpose", [x], perm=[0, 2, 1])
    cls = net.const("patch_embed", "cls", (net.rng.standard_normal((batch, 1, dim)) * 0.5).astype(f32))
    x = net.op("patch_embed", "Concat", [cls, x], axis=1)
    pos = net.const("patch_embed", "pos", (net.rng.standard_normal((1, tokens, dim)) * 0.5).astype(f32))
    x = net.op("patch_embed", "Add", [x, pos])

    def dense(scope: str, y: str, din: int, dout: int, gain: float = 1.0) -> str:
        w = (net.rng.standard_normal((din, dout)) * math.sqrt(gain / din)).astype(f32)
        b = (net.rng.standard_normal(dout) * 0.02).astype(f32)
        return net.op(
            scope, "Add", [net.op(scope, "MatMul", [y, net.const(scope, "W", w)]), net.const(scope, "B", b)]
        )

    def norm(scope: str, y: str) -> str:
        gamma = (1 + 0.1 * net.rng.standard_normal(dim)).astype(f32)
        beta = (0.02 * net.rng.standard_normal(dim)).astype(f32)
        return net.op(
            scope,
            "LayerNormalization",
            [y, net.const(scope, "gamma", gamma), net.const(scope, "beta", beta)],
            axis=-1,
        )

    split = net.const("shapes", "heads", np.array([batch, tokens, heads, dh]))
    merge = net.const("shapes", "tokens", np.array([batch, tokens, dim]))
    for i in range(depth):
        s = f"blocks.{i}.attn"
        h = norm(s + "/norm", x)
        q = net.op(
            s, "Transpose", [net.op(s, "Reshape", [dense(s + "/q", h, dim, dim), split])], perm=[0, 2, 1, 3]
        )
        k = net.op(
            s, "Transpose", [net.op(s, "Reshape", [dense(s + "/k", h, dim, dim), split])], perm=[0, 2, 3, 1]
        )
        v = net.op(
            s, "Transpose", [net.op(s, "Reshape", [dense(s + "/v", h, dim, dim), split])], perm=[0, 2, 1, 3]
        )
        scores = net.op(
            s, "Mul", [net.op(s, "MatMul", [q, k]), net.const(s, "scale", np.array(dh**-0.5, f32))]
        )
        att = net.op(s, "MatMul", [net.op(s, "Softmax", [scores], axis=-1), v])
        att = net.op(s, "Reshape", [net.op(s, "Transpose", [att], perm=[0, 2, 1, 3]), merge])
        x = net.op(s, "Add", [x, dense(s + "/proj", att, dim, dim, 0.5)])
        s = f"blocks.{i}.mlp"
        h = dense(s + "/fc1", norm(s + "/norm", x), dim, dim * mlp_ratio, 2.0)
        erf = net.op(s, "Erf", [net.op(s, "Mul", [h, net.const(s, "rsqrt2", np.array(2**-0.5, f32))])])
        gelu = net.op(
            s,
            "Mul",
            [
                h,
                net.op(
                    s,
                    "Mul",
                    [
                        net.op(s, "Add", [erf, net.const(s, "one", np.array(1, f32))]),
                        net.const(s, "half", np.array(0.5, f32)),
                    ],
                ),
            ],
        )
        x = net.op(s, "Add", [x, dense(s + "/fc2", gelu, dim * mlp_ratio, dim, 0.5)])
    x = norm("head/norm", x)
    x = net.op("head", "Gather", [x, net.const("head", "cls_index", np.array(0, np.int64))], axis=1)
    out = net.linear("head", x, dim, num_classes)
    return net.model((batch, 3, resolution, resolution), out, (batch, num_classes))


def wideconv(
    channels: int = 16, resolution: int = 128, num_classes: int = 10, seed: int = 0, batch: int = 1
) -> onnx.ModelProto:
    """One wide 3x3 conv at full resolution, a 1x1 conv, a pooled head: the 3x3 layer's input and output
    take as long to send as it takes to compute, the case Galaxy+ tiling is for (a split of it pays only
    when its messages overlap its compute)."""
    net = _Net("wideconv", seed)
    x = net.conv_relu("features.0", "input", channels, channels, 3)
    x = net.conv_relu("features.1", x, channels, channels, 1)
    out = net.head(x, channels, num_classes)
    return net.model((batch, channels, resolution, resolution), out, (batch, num_classes))


_BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "inception": inception,
    "mobilenetv2": mobilenetv2,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vgg16": vgg16,
    "vit": vit,
    "wideconv": wideconv,
}
