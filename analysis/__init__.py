"""NeuroX analysis package."""
