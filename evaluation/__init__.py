"""Evaluation suites for lighttransfer models."""
