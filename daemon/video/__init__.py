"""Video generation: the daemon's worker supervisor and the worker program it starts."""
