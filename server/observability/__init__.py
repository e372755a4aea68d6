"""Observability: Prometheus metrics (`metrics.py`), OpenTelemetry traces and structured
logs; what operators see of a running router or executor."""
