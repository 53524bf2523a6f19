"""Two-stream STFN action recognition pipeline: everything a stage needs, but no stage itself."""

__version__ = "0.1.0"
