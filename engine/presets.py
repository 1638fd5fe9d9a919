"""The named model sizes offered in the CLI and the app (no torch: the pages and TrainConfig read them)."""

# "balanced" is the default: on CPUs with bf16 it trains as fast as "fast" (the fifth level works on 1/256 of the
# pixels) and sees twice as far.
PRESETS: dict[str, dict[str, int]] = {
    "fast": {"base": 16, "depth": 3},
    "balanced": {"base": 16, "depth": 4},
    "accurate": {"base": 24, "depth": 4},
    "lean": {"base": 16, "depth": 4, "stem": 2},  # balanced at half resolution: a quarter of its arithmetic
}
