"""``inferlog bench``: every backend side by side on the same weights, settings and token IDs."""
