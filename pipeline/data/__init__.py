"""Videos and what is read from them: datasets, the video table, decoding, the demo, transforms, the hold-out,
sampling rules and the torch Datasets."""

from pipeline.streams import STREAMS  # noqa: F401  (kept for one release: import it from pipeline.streams)
