"""taskring server: stores AI tasks, routes them over a ring of backends, streams progress."""
