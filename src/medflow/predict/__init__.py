"""Trained models → predictions over whole images."""
