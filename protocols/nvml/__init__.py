"""nvml."""
