"""ASO-SE engine: search space, four-phase trainer, compiled steps, growth, data."""
__version__ = "0.1.0"
