"""Model-side code: family adapters, surgery, loading, export classes."""
