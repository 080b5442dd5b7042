"""Releases: the one safe weights loader, export to release folders, one-line loading."""
