"""NeuroX neuro_models package."""
