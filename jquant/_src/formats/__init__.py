"""The quantization formats, one module per family, and the registry of their names.

Adding a format: a new module here with a `Format` subclass (`base.py` lists what it implements)
and its instance in `FORMATS` below.
"""

from __future__ import annotations

from jquant._src.formats.base import Format
from jquant._src.formats.codebook import NF4, KMeans
from jquant._src.formats.floating import FLOATING_FORMATS, FP8E4M3, FP8E5M2, MXFP4, MXFP8, NVFP4
from jquant._src.formats.sign import Sign
from jquant._src.formats.uniform import Uniform

FORMATS = {f.name: f for f in (Uniform(), Sign(), KMeans(), NF4(), *FLOATING_FORMATS)}
"""Every format by the name `QuantSpec(method=...)` accepts as its alias."""


def resolve(method) -> Format:
    """The Format for `method`: a Format object, or the name of a registered one.

    Raises:
      TypeError: neither a Format nor a str. ValueError: an unknown name.
    """
    if isinstance(method, Format):
        return method
    if not isinstance(method, str):
        raise TypeError(f"QuantSpec.method must be a format object or one of the names {', '.join(FORMATS)}, "
                        f"got {type(method).__name__} {method!r}")
    if method not in FORMATS:
        raise ValueError(f"QuantSpec.method={method!r} is unknown; allowed: {', '.join(FORMATS)}")
    return FORMATS[method]
