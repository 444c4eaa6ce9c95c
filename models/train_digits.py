"""Train the shipped digits classifier (scikit-learn's 8x8 digits) and save it as ONNX plus an npz.

Run ``python -m fleetpipe.models.train_digits`` to regenerate ``models/data/digits_mlp.onnx`` and
``models/data/digits_mlp.npz``. Inputs are the 64 pixel values divided by 16 (range 0..1); the
network is Gemm-Relu-Gemm-Relu-Gemm producing 10 logits. The npz holds ``W0, b0, W1, b1, W2, b2``
(``W`` as [in, out]) and the held-out ``x_test``/``y_test`` so the TFLite build and accuracy
measurements use the same model and data.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import onnx

__all__ = ["HIDDEN", "SEED", "build_onnx", "main", "train"]

HIDDEN = (128, 64)
SEED = 0
DATA_DIR = Path(__file__).parent / "data"


def train(seed: int = SEED) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray, float]:
    """Fit the MLP; returns ``(weights, biases, x_test, y_test, test_accuracy)``."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    clf = MLPClassifier(hidden_layer_sizes=HIDDEN, max_iter=400, random_state=seed, early_stopping=False)
    clf.fit(x_train, y_train)
    accuracy = float(clf.score(x_test, y_test))
    weights = [w.astype(np.float32) for w in clf.coefs_]
    biases = [b.astype(np.float32) for b in clf.intercepts_]
    return weights, biases, x_test.astype(np.float32), y_test.astype(np.int64), accuracy


def build_onnx(weights: list[np.ndarray], biases: list[np.ndarray]) -> onnx.ModelProto:
    """The MLP as an ONNX model: input ``input`` [N,64] float32, output ``logits`` [N,10]."""
    import onnx
    from onnx import helper, numpy_helper

    nodes, inits, x = [], [], "input"
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        inits += [numpy_helper.from_array(w, f"fc{i}.W"), numpy_helper.from_array(b, f"fc{i}.b")]
        out = "logits" if i == len(weights) - 1 else f"fc{i}/Gemm"
        nodes.append(helper.make_node("Gemm", [x, f"fc{i}.W", f"fc{i}.b"], [out], name=f"fc{i}/Gemm"))
        x = out
        if i < len(weights) - 1:
            x = f"fc{i}/Relu"
            nodes.append(helper.make_node("Relu", [out], [x], name=x))
    TP = onnx.TensorProto
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("input", TP.FLOAT, ["N", weights[0].shape[0]])],
        [helper.make_tensor_value_info("logits", TP.FLOAT, ["N", weights[-1].shape[1]])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fleetpipe.models.train_digits"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main(argv: list[str] | None = None) -> int:
    """Train, save the .onnx and .npz, print the test accuracy."""
    import numpy as np
    import onnx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-o", "--out-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    weights, biases, x_test, y_test, accuracy = train(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model = build_onnx(weights, biases)
    onnx.save(model, str(args.out_dir / "digits_mlp.onnx"))
    arrays: dict[str, Any] = {f"W{i}": w for i, w in enumerate(weights)}
    arrays |= {f"b{i}": b for i, b in enumerate(biases)}
    arrays |= {"x_test": x_test, "y_test": y_test, "accuracy": np.array(accuracy)}
    np.savez_compressed(args.out_dir / "digits_mlp.npz", **arrays)
    print(f"digits MLP {HIDDEN}: test accuracy {accuracy:.4f} on {len(y_test)} samples -> {args.out_dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
