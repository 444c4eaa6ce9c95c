"""Model input shapes given by the user, and the rule for dynamic input dimensions (pure, no onnx import).

One syntax everywhere (``model inspect``, ``model slice``, ``plan``, ``planner``, ``demo``, ``calibrate``,
the planner's TOML ``input_shape = ["x=1,3,224,224"]`` and ``FLEETPIPE_INPUT_SHAPE``):
``NAME=D,D,...``, one per input, repeatable. ``parse_input_shapes`` also accepts several in one string
separated by ``;`` (or by ``,`` before the next ``NAME=``, which is what a comma-split env var gives).

The rule (``resolve_input_shapes``): a dynamic *first* dimension (``N``, ``batch``, ``-1``, ``d0``, an
unnamed ``?``, ``p2o.DynamicDimension.0``, ...) is the batch and is taken as 1, said in one warning log
line; any other dynamic dimension needs ``--input-shape``, and the error (``InputShapeError``) names the
input, its declared dims and the flag to add.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

from fleetpipe.errors import UnsupportedModel

__all__ = ["Dim", "InputShapeError", "format_dims", "parse_input_shapes", "resolve_input_shapes"]

log = logging.getLogger("fleetpipe.models")

# A declared dimension: a size, a symbolic name, or None (unknown / -1).
Dim = int | str | None


class InputShapeError(UnsupportedModel):
    """An ``--input-shape`` value is malformed, or a model input has a dynamic dim it does not pin."""


def parse_input_shapes(items: str | Iterable[str] | None) -> dict[str, tuple[int, ...]]:
    """``["x=1,3,224,224", "y=1,10"]`` (or ``"x=1,3,224,224;y=1,10"``) -> ``{name: shape}``."""
    if items is None:
        return {}
    if isinstance(items, str):
        items = [items]
    tokens = [tok.strip() for item in items for part in str(item).split(";") for tok in part.split(",")]
    groups: list[list[str]] = []
    for tok in tokens:
        if not tok:
            continue
        if "=" in tok or not groups:
            groups.append([tok])
        else:
            groups[-1].append(tok)
    shapes: dict[str, tuple[int, ...]] = {}
    for group in groups:
        text = ",".join(group)
        name, sep, first = group[0].partition("=")
        name = name.strip()
        try:
            dims = tuple(int(d) for d in [first, *group[1:]])
        except ValueError:
            dims = ()
        if not sep or not name or not dims or any(d < 1 for d in dims):
            raise InputShapeError(
                f"--input-shape expects NAME=D,D,... with positive sizes (e.g. x=1,3,224,224), got {text!r}"
            )
        if name in shapes:
            raise InputShapeError(f"--input-shape gives input {name!r} twice")
        shapes[name] = dims
    return shapes


def format_dims(dims: Sequence[Dim]) -> str:
    """``['N', 3, None, 224]`` -> ``[N, 3, ?, 224]``."""
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def resolve_input_shapes(
    declared: Mapping[str, Sequence[Dim] | None], given: Mapping[str, Sequence[int]] | None = None
) -> dict[str, tuple[int, ...]]:
    """A static shape for every input: given ones (checked), else declared with a dynamic batch as 1.

    ``declared`` maps each real model input to its declared dims (``None``: no shape at all).
    Raises InputShapeError naming the input, its dims and the ``--input-shape`` flag to add.
    """
    given = dict(given or {})
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise InputShapeError(f"--input-shape names {unknown}, which are not model inputs {sorted(declared)}")
    out: dict[str, tuple[int, ...]] = {}
    batches: list[tuple[str, Sequence[Dim]]] = []
    for name, dims in declared.items():
        if name in given:
            out[name] = _check_given(name, dims, tuple(int(d) for d in given[name]))
            continue
        if dims is None:
            raise InputShapeError(
                f"model input {name!r} declares no shape; add --input-shape {name}=D,D,... (its full shape)"
            )
        fixed = list(dims)
        batch = bool(fixed) and not _static(fixed[0])
        if batch:
            fixed[0] = 1
        if not all(_static(d) for d in fixed):
            hint = ",".join(str(d) if _static(d) else f"<{'?' if d is None else d}>" for d in fixed)
            raise InputShapeError(
                f"model input {name!r} has dynamic dims {format_dims(dims)}; add --input-shape {name}={hint} "
                "with the <...> replaced by sizes"
            )
        if batch:
            batches.append((name, dims))
        out[name] = tuple(int(d) for d in fixed)  # type: ignore[arg-type]
    for name, dims in batches:  # only once every input resolved: no batch line before an error
        log.warning(
            "input %r: dynamic batch dim %s taken as 1 (declared %s; --input-shape %s=... to change it)",
            name, format_dims([dims[0]]).strip("[]"), format_dims(dims), name,
        )
    return out


def _static(d: Dim) -> bool:
    return isinstance(d, int) and d > 0


def _check_given(name: str, dims: Sequence[Dim] | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    if dims is None:
        return shape
    if len(dims) != len(shape):
        raise InputShapeError(
            f"--input-shape {name}={','.join(map(str, shape))} has rank {len(shape)}, but input {name!r} is "
            f"declared {format_dims(dims)} (rank {len(dims)})"
        )
    for want, have in zip(shape, dims, strict=True):
        if _static(have) and have != want:
            raise InputShapeError(
                f"--input-shape {name}={','.join(map(str, shape))} conflicts with the static dims of input "
                f"{name!r}: {format_dims(dims)}"
            )
    return shape
