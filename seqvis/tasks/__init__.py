"""Tasks: what the trainer needs to know about one kind of problem (classification, captioning, video)."""
