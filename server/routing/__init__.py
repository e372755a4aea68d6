"""Routing: which backend a task goes to, and which to try next."""

from .ring import EmptyRingError, HashRing, Member

__all__ = ["EmptyRingError", "HashRing", "Member"]
