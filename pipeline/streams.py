"""The two streams of the two-stream network: a leaf module (no imports), read by the data, model, training and
feature code alike."""

#: The two streams of the two-stream network, in the order every store and table lists them.
STREAMS = ("rgb", "flow")
