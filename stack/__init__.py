"""Local stack: the native Triton launcher, model preparation, `make serve` and `make smoke`."""
