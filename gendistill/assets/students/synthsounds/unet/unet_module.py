"""Loads CTMStudent from the installed gendistill package (pip install gendistill)."""
from gendistill.models.student import CTMStudent  # noqa: F401
