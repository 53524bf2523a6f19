"""TV-L1 optical flow in PyTorch, .flo I/O, quantization and colour coding."""
