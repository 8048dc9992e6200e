"""Cache-to-cache communication: pairs, prompt parts, context transfer of K/V over KVWire, text baselines,
and the equal-byte harness that measures every method at the same per-sample byte cap."""
