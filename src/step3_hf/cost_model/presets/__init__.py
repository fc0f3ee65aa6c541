"""Built-in model configs (published config.json fields) for the cost model."""
