"""Folding: the math (pure, float64) and its application to models."""
