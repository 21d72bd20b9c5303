"""Rules: loading, compiled predicates, thresholds, suppression."""
