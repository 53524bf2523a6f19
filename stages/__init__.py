"""One module per pipeline stage; each declares a Stage (see pipeline.cache)."""
