"""Videos and what is read from them: datasets, the video table, decoding, the demo, transforms, the hold-out,
sampling rules and the torch Datasets."""

#: The two streams of the two-stream network, in the order every store and table lists them.
STREAMS = ("rgb", "flow")
