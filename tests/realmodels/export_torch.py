"""Export the corpus's own torch models with ``torch.onnx.export`` and dynamic axes (opsets 11 to 21).

Run once with torch installed (``pip install torch==2.13.0``); the small .onnx files it writes to
tests/realmodels/torch/ are committed with torch.json (ids, opsets, sha256), so tests need no torch.
Each model is what users export in practice, with the shape tricks that broke the front door:

- ``cnn_dyn_o11``: conv/BN/ReLU stages, dynamic batch AND dynamic H, W (global pool + linear head),
  TorchScript exporter at opset 11;
- ``reshape_o13``: a Reshape whose target is computed in the graph (``x.flatten(2)`` after a conv,
  ``Shape -> Gather -> Concat -> Reshape``), dynamic batch, opset 13;
- ``resmlp_o15``: residual MLP blocks over tokens (``view(b, -1, c)``) with LayerNorm, opset 15;
- ``transformer_o17``: a pre-norm transformer encoder block (multi-head attention + MLP),
  dynamic batch, opset 17;
- ``convnext_o21``: ConvNeXt-style depthwise 7x7 + LayerNorm over channels (permutes), dynamic
  batch, opset 21 (the dynamo exporter).

Usage: .venv/bin/python tests/realmodels/export_torch.py [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def build_models() -> list[dict[str, Any]]:
    """The models, each with its example input, dynamic axes and opset."""
    import torch
    from torch import nn

    torch.manual_seed(20261204)

    def randomize_bn(module: nn.Module) -> nn.Module:
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        return module.eval()

    class CNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()

            def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
                return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

            self.features = nn.Sequential(stage(3, 16, 2), stage(16, 24, 1), stage(24, 32, 2), stage(32, 48, 2))
            self.head = nn.Linear(48, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x).mean(dim=(2, 3)))

    class ComputedReshape(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, 2, 1)
            self.conv2 = nn.Conv2d(16, 32, 3, 2, 1)
            self.proj = nn.Linear(32, 32)
            self.head = nn.Linear(32, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
            b, c = y.shape[0], y.shape[1]
            tokens = y.reshape(b, c, -1).transpose(1, 2)  # target shape computed from Shape at run time
            tokens = torch.relu(self.proj(tokens))
            return torch.softmax(self.head(tokens.mean(dim=1)), dim=-1)

    class ResMLP(nn.Module):
        def __init__(self, dim: int = 48, blocks: int = 3) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, dim, 4, 4)
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                for _ in range(blocks)
            )
            self.head = nn.Linear(dim, 7)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.embed(x)
            t = y.view(y.shape[0], y.shape[1], -1).permute(0, 2, 1)
            for block in self.blocks:
                t = t + block(t)
            return self.head(t.mean(dim=1))

    class Block(nn.Module):
        def __init__(self, dim: int = 64, heads: int = 4) -> None:
            super().__init__()
            self.ln1 = nn.LayerNorm(dim)
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.ln2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.ln1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.ln2(x))

    class Transformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(32, 64)
            self.blocks = nn.Sequential(Block(), Block())
            self.head = nn.Linear(64, 12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.blocks(self.embed(x)))

    class ConvNeXtBlock(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
            self.ln = nn.LayerNorm(dim)
            self.pw1 = nn.Linear(dim, 4 * dim)
            self.pw2 = nn.Linear(4 * dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.dw(x).permute(0, 2, 3, 1)
            y = self.pw2(torch.nn.functional.gelu(self.pw1(self.ln(y))))
            return x + y.permute(0, 3, 1, 2)

    class ConvNeXt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 32, 4, 4)
            self.stage1 = nn.Sequential(ConvNeXtBlock(32), ConvNeXtBlock(32))
            self.down = nn.Conv2d(32, 64, 2, 2)
            self.stage2 = nn.Sequential(ConvNeXtBlock(64), ConvNeXtBlock(64))
            self.head = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.stage2(self.down(self.stage1(self.stem(x))))
            return self.head(y.mean(dim=(2, 3)))

    batch = {0: "batch"}
    return [
        {
            "id": "cnn_dyn_o11", "module": randomize_bn(CNN()), "input": torch.randn(1, 3, 64, 64), "opset": 11,
            "dynamo": False, "axes": {0: "batch", 2: "height", 3: "width"}, "input_shape": ["x=1,3,64,64"],
            "description": "conv/BN/ReLU stages, dynamic batch, height and width, TorchScript exporter",
        },
        {
            "id": "reshape_o13", "module": ComputedReshape().eval(), "input": torch.randn(1, 3, 32, 32),
            "opset": 13, "dynamo": False, "axes": batch, "input_shape": [],
            "description": "Reshape whose target is computed from Shape (flatten to tokens), dynamic batch",
        },
        {
            "id": "resmlp_o15", "module": ResMLP().eval(), "input": torch.randn(1, 3, 32, 32), "opset": 15,
            "dynamo": False, "axes": batch, "input_shape": [],
            "description": "residual MLP blocks with LayerNorm over view(b, c, -1) tokens, dynamic batch",
        },
        {
            "id": "transformer_o17", "module": Transformer().eval(), "input": torch.randn(1, 16, 32), "opset": 17,
            "dynamo": False, "axes": batch, "input_shape": [],
            "description": "two pre-norm transformer encoder blocks (4-head attention + MLP), dynamic batch",
        },
        {
            "id": "convnext_o21", "module": ConvNeXt().eval(), "input": torch.randn(1, 3, 64, 64), "opset": 21,
            "dynamo": True, "axes": batch, "input_shape": [],
            "description": "ConvNeXt-style depthwise 7x7 + channel LayerNorm blocks, dynamic batch, dynamo exporter",
        },
    ]


def export(spec: dict[str, Any], path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if spec["dynamo"]:
            batch = torch.export.Dim("batch", min=1, max=64)
            torch.onnx.export(
                spec["module"], (spec["input"],), str(path), input_names=["x"], output_names=["y"],
                opset_version=spec["opset"], dynamo=True, dynamic_shapes=({0: batch},), external_data=False,
            )
        else:
            torch.onnx.export(
                spec["module"], (spec["input"],), str(path), input_names=["x"], output_names=["y"],
                opset_version=spec["opset"], dynamo=False, dynamic_axes={"x": spec["axes"], "y": {0: "batch"}},
            )


def check(spec: dict[str, Any], path: Path) -> float:
    """Max relative difference between onnxruntime at batch 2 and torch (the export really is dynamic)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    x = torch.cat([spec["input"], torch.randn_like(spec["input"])])
    with torch.no_grad():
        want = spec["module"](x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-12))


def main() -> int:
    import onnx
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE / "torch")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    entries = []
    for spec in build_models():
        path = args.out / f"{spec['id']}.onnx"
        export(spec, path)
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        rel = check(spec, path)
        if rel > 1e-4:
            raise SystemExit(f"{spec['id']}: onnxruntime differs from torch by {rel:.3g} (relative)")
        data = path.read_bytes()
        entries.append({
            "id": spec["id"], "file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "opset": spec["opset"], "exporter": f"torch.onnx {torch.__version__.split('+')[0]}"
            + (" (dynamo)" if spec["dynamo"] else " (TorchScript)"),
            "description": spec["description"], "input_shape": spec["input_shape"],
        })
        print(f"{spec['id']}: {len(data)} bytes, opset {spec['opset']}, rel diff vs torch at batch 2 {rel:.2g}")
    (args.out / "torch.json").write_text(json.dumps({"models": entries}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
