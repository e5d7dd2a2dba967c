"""Measured max |differences| of the parity tests, printed in pytest's terminal summary
(see conftest.py) so every run shows the numbers the README quotes."""

TABLES = {}


def table(name: str) -> dict:
    """The dict a test module records its measurements in, under `name`."""
    return TABLES.setdefault(name, {})
