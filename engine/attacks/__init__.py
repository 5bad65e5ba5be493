"""Attacks on erased models."""
