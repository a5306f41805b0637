"""Helpers that stand up real services for tests, the demo and the bench."""
