"""Loads CTMScheduler from the installed gendistill package (pip install gendistill)."""
from gendistill.pipelines.ctm import CTMScheduler  # noqa: F401
