"""Deployment: export, engine builders, runtimes, stream readers, real-time validation."""
