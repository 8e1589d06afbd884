"""Plumbing under training: atomic file writes, precision, strategies, signals, value ranges, a quiet terminal."""
