"""The training stack by concern: config (no torch), losses, schedule, validation, checkpoints, record; the loop is
still engine/train.py."""
