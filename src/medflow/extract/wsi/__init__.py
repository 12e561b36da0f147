"""Whole-slide images → labelled 224² patches at a chosen µm/px (OpenSlide, tissue mask, annotation polygons)."""
