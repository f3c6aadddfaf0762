"""Resolution and quality measures (FSC)."""
