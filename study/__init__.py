"""NeuroX study package."""
