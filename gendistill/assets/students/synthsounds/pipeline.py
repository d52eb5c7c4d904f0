"""Loads SoundCTMPipeline from the installed gendistill package (pip install gendistill)."""
from gendistill.pipelines import SoundCTMPipeline  # noqa: F401
