"""The expectation-maximisation machinery: scoring (E-step) and reconstruction (M-step)."""
