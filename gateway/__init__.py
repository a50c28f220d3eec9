"""Demand-response gateway: domain and orchestration (imports no protocol library)."""
