"""Data tests: Great Expectations suites, splits, ingest invariants, augmentation of the data."""
