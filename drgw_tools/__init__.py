"""Tools beside the gateway, not part of it: benchmarks (``drgw bench ...``) and the private brokers the
tests and benchmarks start. Nothing in ``gateway`` or ``protocols`` imports this package at run time."""
