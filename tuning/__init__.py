"""Tuning: Ray Tune around the same Ray Train + DeepSpeed trainer (search spaces from dotted config paths)."""
