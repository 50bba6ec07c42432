"""Cell detection (placeholder package; filled by the detector issue)."""
