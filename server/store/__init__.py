"""Durable task storage: the TaskStore protocol and its implementations."""
