"""Experiment configs (``ml_collections``); run from the repository root, see ``common.py``."""
