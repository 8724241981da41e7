"""Post-training quantization (private implementation of `jquant.ptq`)."""
