"""The built-in pipeline stages, one module each."""
