"""ray_faceid."""
