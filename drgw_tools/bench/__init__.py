"""Benchmarks behind ``drgw bench ...``; each prints what it measured."""
