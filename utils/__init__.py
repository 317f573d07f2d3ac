"""Helpers for the RSNA intracranial hemorrhage pipeline; kernel.py runs them in order."""
