"""jquant: functional quantization transforms for JAX."""
from jquant.spec import QuantSpec
from jquant.qarray import QArray, quantize, dequantize
from jquant.ste import ste_round, fake_quant
from jquant.dot import Accumulator, dot_general, int_dot_general, requantize
from jquant.policy import Policy, Rule, int4_weights, int8_weights, w8a8
from jquant.transforms import dequantize_params, fake_quant_params, quantize_params
from jquant.report import Report, report
from jquant.ops import QuantConv, QuantDot, QuantEinsum
from jquant import flax
from jquant.checkpoint import load, save
