"""jquant's implementation (private): the public names are re-exported by `jquant`, `jquant.ptq`,
`jquant.learned` and `jquant.flax`."""
