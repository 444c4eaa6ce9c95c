"""The planner's per-layer cost matrix from what nodes measured (``wire.NodeProfile``) and the learned estimator.

Every node times the layers of each ONNX slice it loads and publishes them, retained. A cell
``compute_ms[layer, node]`` of the planner's problem is, in order of preference:

``reported``
    the node timed this layer (its latest report for this model);
``ratio``
    the node timed other layers of the model: the host's time for the layer times the median of that
    node's reported / host ratios (its real speed against this host, not its speed figure's guess);
``learned``
    the estimator (gradient-boosted trees, FlexPie) fitted on every report, where it validates better:
    for a node that reported nothing, if it predicts each reporting node better than speed scaling when
    that node is held out of the fit; for the unreported layers of a reporting node, if it predicts each
    held-out half of a reporting node's layers better than that node's ratio from the other half;
``scaled``
    the host's time times ``node_slowdown`` (the emulation factor, or the ratio of the speed figures).

The learned model here is the run-time form of ``fleetpipe.planner.estimator``: the planner always has
this model's host profile, so the host time of the layer is a feature and the target is the node's time
relative to it (``log(ms / host_ms)``) from the layer's features and the device's speed figure (against
the host's) and threads. On an emulated fleet speed scaling is exact by construction and the validation
keeps it; on devices whose speed does not scale uniformly (small layers overhead-bound, threads helping
only big layers) the trees can win, and only then are they used.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["CostMatrix", "ReportedCosts"]

# A node needs this many reported layers (with a measurable host time) before its ratio replaces its
# speed figure, and the learned model this many reporting nodes (each held out once) before it is tried.
MIN_RATIO_LAYERS = 2
MIN_LEARN_NODES = 2
# The learned model must beat speed scaling's (or a node's ratio's) median held-out error by this factor.
LEARN_MARGIN = 0.9
# Hold out at most this many reporting nodes (those with the most layers) per validation: bounds the fits
# per re-plan (a fit takes some 20-100 ms here) however large the fleet.
MAX_FOLD_NODES = 6
_HOST_EPS_MS = 1e-3


@dataclass(frozen=True, slots=True)
class CostMatrix:
    """``compute_ms[L, D]`` and where each cell came from (``source[L, D]``, see the module docstring)."""

    compute_ms: np.ndarray
    source: np.ndarray
    learned: bool  # the trees cost the nodes that reported nothing
    validation: Mapping[str, float] = field(default_factory=dict)
    learned_layers: bool = False  # the trees cost the layers reporting nodes did not run

    def summary(self, names: Sequence[str]) -> str:
        """One log line: per node, how many layers came from each source."""
        parts = []
        for d, name in enumerate(names):
            kinds, counts = np.unique(self.source[:, d], return_counts=True)
            parts.append(f"{name} " + "+".join(f"{c} {k}" for k, c in zip(kinds, counts, strict=True)))
        extra = ""
        v = self.validation
        if "learned" in v:
            extra = (f"; learned {'used' if self.learned else 'not used'} for unreported nodes (held-out median "
                     f"error {v['learned']:.2f} vs scaling {v['scaled']:.2f} over {int(v['n'])} layers)")
        if "layers_learned" in v:
            extra += (f"; learned {'used' if self.learned_layers else 'not used'} for unreported layers "
                      f"({v['layers_learned']:.2f} vs the node's ratio {v['layers_ratio']:.2f})")
        return ", ".join(parts) + extra


class ReportedCosts:
    """The layer times nodes reported for one model, and the cost matrices built from them."""

    def __init__(self, model_id: str, host_ms: np.ndarray, host_speed: float,
                 layer_x: Callable[[], np.ndarray] | np.ndarray | None = None) -> None:
        self.model_id = model_id
        self.host_ms = np.asarray(host_ms, dtype=np.float64)
        self.host_speed = float(host_speed)
        self._layer_x = layer_x
        self.reports: dict[str, dict[int, float]] = {}
        self.threads: dict[str, int] = {}
        self._fit_cache: tuple[Any, Any] | None = None

    def add(self, msg: Any) -> bool:
        """Fold in a ``wire.NodeProfile``; False (ignored) when it is for another model or out of range."""
        if msg.model_id != self.model_id or msg.last_layer >= len(self.host_ms):
            return False
        layers = self.reports.setdefault(msg.node_id, {})
        for i, ms in enumerate(msg.layer_ms):
            layers[msg.first_layer + i] = float(ms)
        self.threads[msg.node_id] = int(msg.threads)
        self._fit_cache = None
        return True

    def matrix(self, names: Sequence[str], births: Sequence[Any], slowdown: Callable[[Any], float]) -> CostMatrix:
        """The cost matrix for nodes ``names`` (their births give speed figures; ``slowdown(birth)`` the
        scaling fallback)."""
        n_l = len(self.host_ms)
        compute = np.empty((n_l, len(names)))
        source = np.empty((n_l, len(names)), dtype=object)
        scaled = [float(slowdown(b)) for b in births]
        missing = []
        for d, name in enumerate(names):
            rep = self.reports.get(name, {})
            ratio = self._ratio(rep)
            if ratio is None:
                compute[:, d] = self.host_ms * scaled[d]
                source[:, d] = "scaled"
                missing.append(d)
            else:
                compute[:, d] = self.host_ms * ratio
                source[:, d] = "ratio"
        model, validation = self._fitted(births, names, slowdown)
        v = validation
        learned = model is not None and bool(missing) and v["learned"] < LEARN_MARGIN * v["scaled"]
        learned_layers = (model is not None and len(missing) < len(names) and "layers_learned" in v
                          and v["layers_learned"] < LEARN_MARGIN * v["layers_ratio"])
        for d, name in enumerate(names):
            if (learned and d in missing) or (learned_layers and d not in missing):
                compute[:, d] = self._predict(model, births[d], self.threads.get(name, 1))
                source[:, d] = "learned"
            for layer, ms in self.reports.get(name, {}).items():
                compute[layer, d], source[layer, d] = ms, "reported"
        return CostMatrix(compute, source, learned, validation, learned_layers)

    # -- internals -------------------------------------------------------------------------------------

    def _ratio(self, rep: Mapping[int, float]) -> float | None:
        ratios = [ms / self.host_ms[k] for k, ms in rep.items() if self.host_ms[k] > _HOST_EPS_MS]
        return float(np.median(ratios)) if len(ratios) >= MIN_RATIO_LAYERS else None

    def layer_x(self) -> np.ndarray:
        if callable(self._layer_x):
            self._layer_x = self._layer_x()
        if self._layer_x is None:
            self._layer_x = np.log(np.maximum(self.host_ms, _HOST_EPS_MS))[:, None]
        return np.asarray(self._layer_x, dtype=np.float64)

    def _layers(self, node: str) -> list[int]:
        """A reporting node's layers with a measurable host time, in order."""
        return [k for k in sorted(self.reports[node]) if self.host_ms[k] > _HOST_EPS_MS]

    def _rows(self, node: str, speed: float, layers: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Features and targets (log of ms / host ms) of one reporting node's layers (default: all)."""
        layers = self._layers(node) if layers is None else list(layers)
        x = np.array([self._features(k, speed, self.threads.get(node, 1)) for k in layers]).reshape(len(layers), -1)
        y = np.log(np.maximum([self.reports[node][k] / self.host_ms[k] for k in layers], 1e-9))
        return x, y

    def _features(self, layer: int, speed: float, threads: int) -> np.ndarray:
        lx = self.layer_x()[layer]
        return np.concatenate([lx, [math.log(max(self.host_ms[layer], _HOST_EPS_MS)),
                                    math.log(max(self.host_speed, 1e-9) / max(speed, 1e-9)), float(threads)]])

    def _predict(self, model: Any, birth: Any, threads: int) -> np.ndarray:
        x = np.array([self._features(k, float(birth.speed), threads) for k in range(len(self.host_ms))])
        return self.host_ms * np.exp(model.predict(x))

    def _fitted(self, births: Sequence[Any], names: Sequence[str], slowdown: Callable[[Any], float]
                ) -> tuple[Any, dict[str, float]]:
        """The learned model if it validates better than scaling (else None), and the validation figures."""
        by_name = dict(zip(names, births, strict=True))
        reporters = [n for n in self.reports if n in by_name and self._ratio(self.reports[n]) is not None]
        key = tuple(sorted(reporters))
        if self._fit_cache is not None and self._fit_cache[0] == key:
            return self._fit_cache[1]
        out: tuple[Any, dict[str, float]] = (None, {})
        if len(reporters) >= MIN_LEARN_NODES:
            out = self._validate_and_fit(reporters, by_name, slowdown)
        self._fit_cache = (key, out)
        return out

    def _validate_and_fit(self, reporters: Sequence[str], by_name: Mapping[str, Any],
                          slowdown: Callable[[Any], float]) -> tuple[Any, dict[str, float]]:
        try:
            from sklearn.ensemble import HistGradientBoostingRegressor
        except ImportError:
            log.info("planner: scikit-learn is not installed; unprofiled nodes are costed by speed scaling")
            return None, {}

        def fit(nodes: Sequence[str], only: tuple[str, Sequence[int]] | None = None) -> Any:
            """Trees on the host and ``nodes`` (``only``: of that node, just these layers)."""
            # The host itself is a device too: every layer at ratio 1 at the host's speed and one thread.
            xs = [np.array([self._features(k, self.host_speed, 1) for k in range(len(self.host_ms))])]
            ys = [np.zeros(len(self.host_ms))]
            for n in nodes:
                x, y = self._rows(n, float(by_name[n].speed), only[1] if only and only[0] == n else None)
                xs.append(x)
                ys.append(y)
            model = HistGradientBoostingRegressor(max_iter=150, learning_rate=0.1, max_leaf_nodes=15,
                                                  min_samples_leaf=3, l2_regularization=1e-3, random_state=0)
            return model.fit(np.vstack(xs), np.concatenate(ys))

        def rel(pred: np.ndarray, true: np.ndarray) -> list[float]:
            return list(np.abs(pred - true) / np.maximum(true, 1e-9))

        # Devices: each reporting node held out, against speed scaling.
        folds = sorted(reporters, key=lambda n: -len(self.reports[n]))[:MAX_FOLD_NODES]
        err_learned, err_scaled = [], []
        for held in folds:
            model = fit([n for n in reporters if n != held])
            birth = by_name[held]
            layers = self._layers(held)
            true = np.array([self.reports[held][k] for k in layers])
            err_learned += rel(self._predict(model, birth, self.threads.get(held, 1))[layers], true)
            err_scaled += rel(self.host_ms[layers] * slowdown(birth), true)
        validation = {"learned": float(np.median(err_learned)), "scaled": float(np.median(err_scaled)),
                      "n": float(len(err_learned))}
        # Layers: each half of a reporting node's layers held out (its stages are contiguous runs of layers),
        # against that node's ratio measured on the other half.
        lay_learned, lay_ratio = [], []
        for node in folds:
            layers = self._layers(node)
            if len(layers) < 2 * MIN_RATIO_LAYERS:
                continue
            mid = len(layers) // 2
            for held, kept in ((layers[:mid], layers[mid:]), (layers[mid:], layers[:mid])):
                model = fit(reporters, only=(node, kept))
                true = np.array([self.reports[node][k] for k in held])
                ratio = float(np.median([self.reports[node][k] / self.host_ms[k] for k in kept]))
                lay_learned += rel(self._predict(model, by_name[node], self.threads.get(node, 1))[held], true)
                lay_ratio += rel(self.host_ms[held] * ratio, true)
        if lay_learned:
            validation.update(layers_learned=float(np.median(lay_learned)), layers_ratio=float(np.median(lay_ratio)))
        wins = validation["learned"] < LEARN_MARGIN * validation["scaled"] or (
            lay_learned and validation["layers_learned"] < LEARN_MARGIN * validation["layers_ratio"])
        return (fit(list(reporters)) if wins else None), validation
