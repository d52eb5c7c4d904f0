"""Loads MelVocoder from the installed gendistill package (pip install gendistill)."""
from gendistill.pipelines.audio import MelVocoder  # noqa: F401
