"""Features as filters attached to routes in ordered phases (see base.py)."""
