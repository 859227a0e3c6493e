"""Willi: a recipient-routing SMTP proxy for the MX role."""

__version__ = "0.1.0"
