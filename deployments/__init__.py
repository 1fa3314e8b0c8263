"""Ray Serve: the composed application (ingress, face encoder, generator) over ray_faceid."""
