"""Loads CTMPipeline from the installed gendistill package (pip install gendistill)."""
from gendistill.pipelines import CTMPipeline  # noqa: F401
