"""Stores: per-video frame and flow containers and the consolidated feature store (Zarr / HDF5)."""
