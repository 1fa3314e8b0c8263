"""Ray Train jobs: adapter training on cross-training pairs, and per-identity adaptation."""
