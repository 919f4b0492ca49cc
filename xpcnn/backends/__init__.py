"""Backends: choosing an array library and device, its diagnostics, and the ranks' communicators."""
