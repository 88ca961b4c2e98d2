"""NeuroX data package."""
