"""Executor backends: where a task actually runs."""
