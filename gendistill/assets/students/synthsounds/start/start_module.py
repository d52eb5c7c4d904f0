"""Loads GaussianStart from the installed gendistill package (pip install gendistill)."""
from gendistill.models.start import GaussianStart  # noqa: F401
