"""Evaluations of trained models: `niah` (long-video needle in a haystack)."""
