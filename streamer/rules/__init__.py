"""Pure decisions with typed results, no I/O: readiness, calibration choice, retention, eviction, budget, failures."""
