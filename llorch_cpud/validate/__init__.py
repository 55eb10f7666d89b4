"""Validation against independent references: checkpoints, references/ (one module each), report, bugs."""
