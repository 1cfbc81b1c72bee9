"""Calibration text for the analysis: read files or build synthetic passkey prompts, cut token rows."""

from .calibration_set import SYNTHETIC_SOURCES, CalibrationSet, check_sources, load_calibration
from .passkey import PasskeySample, make_passkey_sample, passkey_samples
from .sources import SHIPPED_TEXT, Document, collect_documents

__all__ = [
    "CalibrationSet",
    "Document",
    "PasskeySample",
    "SHIPPED_TEXT",
    "SYNTHETIC_SOURCES",
    "check_sources",
    "collect_documents",
    "load_calibration",
    "make_passkey_sample",
    "passkey_samples",
]
