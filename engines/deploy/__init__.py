"""Handing a bundle to a server: Triton model repositories."""
