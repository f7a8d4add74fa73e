"""The command lines beside `python -m runtime`'s (runtime/__main__.py): the image tools
(`tools`) and what they share (`common`)."""
