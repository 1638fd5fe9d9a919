"""The training stack, split by concern (config first; the rest still lives in engine/train.py)."""
