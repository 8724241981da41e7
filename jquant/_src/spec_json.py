"""A `QuantSpec` as a JSON object and back: the one form in which checkpoints (Orbax metadata, the
version-1 zip manifest) and safetensors files record specs.

The object has every `QuantSpec` dataclass field under its own name (`rotation` and
`equalization` only when set); tuples become lists, `method` is the format's registered name
(which `QuantSpec` resolves back), and `calibration`, `rotation` and `equalization` are
`{"type": <class name>, <its fields>}`, e.g.
`{"bits": 4, "symmetric": false, "midrise": false, "channel_axes": [1], "group_size": 128,
"group_axis": null, "method": "uniform", "calibration": {"type": "MinMax"},
"rotation": {"type": "Hadamard", "seed": 0, "block": null}}` — the seed fixes R's signs, so a
loaded rotated QArray dequantizes bit for bit as before (an equalized one's r is an array of the
QArray, saved with it).
"""

from __future__ import annotations

import dataclasses

from jquant._src import calibration, equalization, rotation
from jquant._src.spec import QuantSpec


def spec_to_json(spec: QuantSpec) -> dict:
    # Every dataclass field, so a field added to QuantSpec is saved without touching this module.
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    fields["calibration"] = {"type": type(spec.calibration).__name__, **dataclasses.asdict(spec.calibration)}
    for name in ("rotation", "equalization"):
        value = getattr(spec, name)
        if value is None:  # absent, not null: files without one read as before, by older jquant too
            del fields[name]
        else:
            fields[name] = {"type": type(value).__name__, **dataclasses.asdict(value)}
    fields["method"] = spec.method.name
    return {name: list(v) if isinstance(v, tuple) else v for name, v in fields.items()}


def spec_from_json(fields: dict) -> QuantSpec:
    """The QuantSpec `spec_to_json` wrote. Raises TypeError/ValueError (QuantSpec's own) for
    fields this jquant cannot build, and ValueError for an unknown calibration, rotation or
    equalization type."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    for name, classes in (("calibration", calibration.CALIBRATIONS), ("rotation", (rotation.Hadamard,)),
                          ("equalization", (equalization.Equalize,))):
        if fields.get(name) is not None:
            fields[name] = _object(name, fields[name], classes)
    return QuantSpec(**fields)


def _object(name: str, fields: dict, classes):
    options = dict(fields)
    kinds = {cls.__name__: cls for cls in classes}
    kind = options.pop("type", None)
    if kind not in kinds:
        raise ValueError(f"unknown {name} {kind!r}; allowed: {', '.join(kinds)}")
    return kinds[kind](**options)
