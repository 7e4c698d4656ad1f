"""The scene world, real-format loaders and feature caching."""
