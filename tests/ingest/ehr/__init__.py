"""Tests for the EHR variable schema and row checks."""
