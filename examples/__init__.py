"""Example custom task types: plain Python handlers taskring loads by configuration."""
