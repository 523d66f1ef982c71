"""tfds builders for data that must work offline."""
