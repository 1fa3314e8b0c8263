"""The identity methods: torch modules and diffusers attention processors. No ray imports here."""
