"""A `QuantSpec` as a JSON object and back: the one form in which checkpoints (Orbax metadata, the
version-1 zip manifest) and safetensors files record specs.

The object has every `QuantSpec` dataclass field under its own name; tuples become lists,
`method` is the format's registered name (which `QuantSpec` resolves back), and `calibration` is
`{"type": <class name>, <its fields>}`, e.g.
`{"bits": 4, "symmetric": false, "midrise": false, "channel_axes": [1], "group_size": 128,
"group_axis": null, "method": "uniform", "calibration": {"type": "MinMax"}}`.
"""

from __future__ import annotations

import dataclasses

from jquant._src import calibration
from jquant._src.spec import QuantSpec


def spec_to_json(spec: QuantSpec) -> dict:
    # Every dataclass field, so a field added to QuantSpec is saved without touching this module.
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    fields["calibration"] = {"type": type(spec.calibration).__name__, **dataclasses.asdict(spec.calibration)}
    fields["method"] = spec.method.name
    return {name: list(v) if isinstance(v, tuple) else v for name, v in fields.items()}


def spec_from_json(fields: dict) -> QuantSpec:
    """The QuantSpec `spec_to_json` wrote. Raises TypeError/ValueError (QuantSpec's own) for
    fields this jquant cannot build, and ValueError for an unknown calibration type."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    if "calibration" in fields:
        options = dict(fields["calibration"])
        kinds = {cls.__name__: cls for cls in calibration.CALIBRATIONS}
        kind = options.pop("type", None)
        if kind not in kinds:
            raise ValueError(f"unknown calibration {kind!r}; allowed: {', '.join(kinds)}")
        fields["calibration"] = kinds[kind](**options)
    return QuantSpec(**fields)
