"""Integrations with training frameworks; each module imports its framework only when imported
itself (``import localsgd`` imports none of them)."""
