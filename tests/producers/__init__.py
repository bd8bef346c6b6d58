"""Producers of real checkpoints written by training libraries (test-only; they import the libraries)."""
