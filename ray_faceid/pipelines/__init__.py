"""Diffusers pipelines with identities: model loading, generate, inpaint. No ray imports here."""
