"""Helpers for tests only: fakes of what the tests put beside real services (never imported by shipped code)."""
