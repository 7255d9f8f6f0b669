"""Evaluation beyond the trainer's single centre crop: multi-crop views (and, later, ensembles)."""
