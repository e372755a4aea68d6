"""Fan-out of task events to Stream watchers."""
