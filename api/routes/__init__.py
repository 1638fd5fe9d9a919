"""Thin route modules: parameters in, one call into the serving state, the answer out."""
