"""jquant: functional quantization transforms for JAX."""
from jquant.spec import QuantSpec
from jquant.qarray import QArray, quantize, dequantize
from jquant.ste import ste_round, fake_quant
from jquant.dot import Accumulator, dot_general, int_dot_general, requantize
