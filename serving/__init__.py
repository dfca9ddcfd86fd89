"""Serving: export and optimization of artifacts, inference engines, and the Ray Serve application."""
