"""Admission: is the caller's request acceptable (validation; later auth and limits)."""
