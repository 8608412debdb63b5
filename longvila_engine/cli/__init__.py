"""Command-line entry points beside `python -m longvila_engine.train`."""
