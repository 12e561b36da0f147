"""Hyperspectral images → calibrated, normalised cubes → k×k×bands patches around labelled pixels."""
