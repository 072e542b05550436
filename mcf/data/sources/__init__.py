"""Fetch sources: each turns its inputs into rows and bytes; ``image`` turns bytes into files."""
