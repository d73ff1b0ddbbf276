"""Placeholder: filled in by the aggregator work."""

__all__ = []
