"""Dispatch: claims queued tasks in priority order and runs them on ring members."""
