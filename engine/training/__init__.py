"""The training stack by concern: config (no torch), losses, schedule; the loop is still engine/train.py."""
