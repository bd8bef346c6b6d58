"""End-to-end tests against checkpoints written by real training libraries."""
