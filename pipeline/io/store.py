"""Frame, flow and feature stores over Zarr (v3) and HDF5, behind one interface.

Layout (see ``docs/formats.md`` for the full description and plain h5py / zarr examples):

* Frames and flow are **per-video containers** under a store folder: ``<root>/<video_id>.zarr`` (a Zarr v3
  group, i.e. a folder) or ``<root>/<video_id>.h5`` (one HDF5 file). One container per video makes every
  video an atomic unit: it is written under a temporary name and renamed into place, so a killed run never
  leaves a half-written video under its final name, and HDF5's lack of crash safety cannot damage other
  videos.
* An image sequence inside a container is stored either as JPEG-in-array (``<name>/jpeg``: all JPEG bytes
  of the sequence concatenated in a 1-D uint8 array whose attributes hold the int64 byte ``offsets``, their
  ``offsets_crc32`` and ``planes``) or as raw uint8 chunks (``<name>/raw``: (T, H, W, C) uint8, one frame
  per chunk, compressed losslessly). Either way a Zarr video is 4 files, an HDF5 video 1.
* Features are one consolidated container (``features.zarr`` / ``features.h5``) holding every video,
  written at the end of ``extract-features`` one chunk of videos at a time (:func:`feature_store_writer`: memory
  holds one chunk whatever the number of videos) under a temporary name, renamed into place when complete.

Nothing here knows about stages; the stages decide what to store.
"""
from __future__ import annotations

import json
import os
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from pipeline.io.atomic import TMP_PREFIX, atomic_dir, jsonable, remove_path

#: The store format written, in every container's ``format_version``; bumped when the layout changes.
#: 2: per-chunk checksums (crc32c / fletcher32), sharded Zarr arrays, flow codecs (planar JPEG, zstd).
#: 3: a JPEG sequence's offsets are attributes of its ``jpeg`` array (no ``offsets`` array: 4 files per Zarr
#: video instead of 6), checked against their CRC-32 when read.
FORMAT_VERSION = 3
#: Formats this code reads, all with the same meaning: format 1 (no checksums, one file per chunk; ``pipeline
#: verify`` counts such containers, which it cannot check, and re-running with --force rewrites them) and 2
#: (a ``<name>/offsets`` array beside ``<name>/jpeg``).
READABLE_FORMATS = (1, 2, 3)
#: The formats with per-chunk checksums (what ``pipeline verify`` can check).
CHECKSUMMED_FORMATS = (2, 3)

BACKENDS = ("zarr", "h5")
#: Image sequence codecs: ``jpeg`` (lossy JPEG-in-array; images with 2 channels, such as flow, are stored
#: as one grayscale JPEG per channel, TSN / denseflow's x and y images), ``raw`` (lossless, Blosc-LZ4 in
#: Zarr, LZF in HDF5), ``zstd`` (lossless, Zstandard in Zarr; gzip in HDF5, whose Zstandard filter is a
#: plugin h5py does not ship).
IMAGE_CODECS = ("jpeg", "raw", "zstd")
_EXT = {"zarr": ".zarr", "h5": ".h5"}


class StoreError(RuntimeError):
    """A store on disk is missing, unreadable, or written by an incompatible version."""


class MissingArray(StoreError, KeyError):
    """A container lacks an array (or image sequence) it must hold; the message names the file. Also a KeyError,
    for the callers that look an array up by name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown store backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


# ----------------------------------------------------------------------------------------------------------
# JPEG helpers (torchvision's libjpeg-turbo bindings; CUDA decode through nvjpeg where available)
# ----------------------------------------------------------------------------------------------------------

def encode_jpeg_frames(frames: np.ndarray, quality: int = 95) -> tuple[np.ndarray, np.ndarray]:
    """Encode RGB frames to one concatenated JPEG byte array.

    Args:
        frames: (T, H, W, 3) uint8 RGB (or (T, H, W, 1) / (T, H, W) grayscale).
    Returns:
        data: (sum of sizes,) uint8, offsets: (T + 1,) int64 with frame t in ``data[offsets[t]:offsets[t+1]]``.
    """
    import cv2

    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] not in (1, 3):
        raise ValueError(f"expected (T, H, W, 3|1) uint8 frames, got {frames.shape} {frames.dtype}")
    params = [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)]
    chunks = []
    for frame in frames:
        img = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR) if frame.shape[-1] == 3 else frame[..., 0]
        ok, buf = cv2.imencode(".jpg", img, params)
        if not ok:
            raise StoreError("JPEG encoding failed")
        chunks.append(buf.reshape(-1))
    return _concat_images(chunks)


def _imdecode(buf: np.ndarray) -> np.ndarray:
    """One JPEG's pixels, (H, W, 3) RGB or (H, W, 1) gray uint8, through OpenCV (libjpeg-turbo)."""
    import cv2

    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise StoreError("corrupt JPEG data (OpenCV cannot decode it)")
    return img[..., None] if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_jpeg_frames(data: np.ndarray, offsets: np.ndarray, indices: Sequence[int], device: str = "cpu",
                       planes: int = 1):
    """Decode frames ``indices`` of a JPEG-in-array sequence; returns a (k, H, W, C) uint8 torch tensor.

    ``planes``: JPEG images per frame (2 for flow: one grayscale image per channel, stacked as channels).
    The CPU path decodes with ``cv2.imdecode``; a CUDA device decodes 1-plane sequences with nvJPEG
    (torchvision).
    """
    import torch

    idx = list(indices)
    if not idx:
        raise ValueError("no frame indices given")
    if str(device).startswith("cuda") and planes == 1:
        from torchvision.io import ImageReadMode, decode_jpeg

        bufs = [torch.from_numpy(np.ascontiguousarray(data[offsets[i]:offsets[i + 1]])) for i in idx]
        imgs = decode_jpeg(bufs, mode=ImageReadMode.UNCHANGED, device=device)
        return torch.stack(imgs).permute(0, 2, 3, 1).contiguous()
    frames = []
    for i in idx:
        imgs = [_imdecode(data[offsets[i * planes + c]:offsets[i * planes + c + 1]]) for c in range(planes)]
        frames.append(imgs[0] if planes == 1 else np.concatenate(imgs, axis=-1))
    out = torch.from_numpy(np.stack(frames))
    return out.to(device) if str(device) != "cpu" else out


def encode_jpeg_planes(images: np.ndarray, quality: int = 95) -> tuple[np.ndarray, np.ndarray]:
    """Encode (T, H, W, C) uint8 images as one grayscale JPEG per channel, in the order t0c0, t0c1, t1c0, ...

    Returns the concatenated bytes and (T * C + 1,) int64 offsets (image ``t * C + c`` is channel ``c`` of
    frame ``t``). For quantized flow (C = 2) each image is what TSN / denseflow write as ``flow_x`` /
    ``flow_y``.
    """
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected (T, H, W, C) uint8 images, got {images.shape} {images.dtype}")
    planes = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(-1, *images.shape[1:3])
    return encode_jpeg_frames(planes, quality)


def _concat_images(images: Sequence[bytes | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    chunks = [np.frombuffer(b, dtype=np.uint8) if isinstance(b, bytes) else np.asarray(b, np.uint8).reshape(-1)
              for b in images]
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in chunks], out=offsets[1:])
    data = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
    return data, offsets


# ----------------------------------------------------------------------------------------------------------
# Per-video containers
# ----------------------------------------------------------------------------------------------------------

#: Zarr stores every chunk, also one equal to the fill value (zarr 3 skips those by default), so that a chunk
#: file found missing is missing data (a deleted chunk would otherwise read back as zeros): :func:`missing_chunks`.
_EVERY_CHUNK = {"write_empty_chunks": True}


class _Container:
    """Backend-neutral view of one open container: named arrays plus a JSON attribute dict."""

    def __init__(self, backend: str, handle: Any, path: Path | None = None):
        self.backend = backend
        self.handle = handle
        self.path = path

    # -- writing --
    def create(self, name: str, data: np.ndarray, *, chunks: tuple[int, ...] | None = None,
               compress: bool = True, compression: str = "lz4", attrs: Mapping[str, Any] | None = None,
               shard: bool = False) -> None:
        """Write array ``name``; ``compression``: lz4 (Blosc-LZ4 + shuffle in Zarr, LZF in HDF5) or zstd
        (Zstandard in Zarr, gzip in HDF5). Every chunk carries a checksum (Zarr: crc32c; HDF5: fletcher32),
        verified when it is read. ``shard`` (Zarr): every chunk in one shard file (an HDF5 file is one file)."""
        data = np.ascontiguousarray(data)
        if compression not in ("lz4", "zstd"):
            raise ValueError(f"unknown compression {compression!r}")
        if self.backend == "h5":
            kw: dict[str, Any] = {}
            if data.size and chunks is not None:
                kw["chunks"] = tuple(min(c, s) for c, s in zip(chunks, data.shape)) or None
            if data.size:
                kw.update(_h5_filters(data.dtype, compress, compression))
            ds = self.handle.create_dataset(name, data=data, **kw)
            for k, v in (attrs or {}).items():
                ds.attrs[k] = json.dumps(jsonable(v))
            return
        import zarr
        from zarr.codecs import Crc32cCodec

        path = f"{self.handle.path}/{name}".lstrip("/")
        if data.dtype.kind in "US":  # variable-length UTF-8, the string type with a Zarr v3 spec
            arr = zarr.create_array(self.handle.store, name=path, shape=data.shape, dtype=str,
                                    chunks=tuple(max(1, s) for s in data.shape), compressors=[Crc32cCodec()],
                                    config=_EVERY_CHUNK)
            arr[...] = data.astype(str).astype(object)
        else:
            codec = _zarr_codecs(data.dtype, compress, compression)
            chunk_shape = chunks if chunks is not None else "auto"
            if data.size == 0:
                chunk_shape = tuple(max(1, s) for s in data.shape) or (1,)
            elif chunks is not None:
                chunk_shape = tuple(max(1, min(c, s)) for c, s in zip(chunks, data.shape))
            shards = None
            if shard and data.size and chunks is not None:  # the whole array as one shard file
                shards = tuple(-(-s // c) * c for s, c in zip(data.shape, chunk_shape))
            arr = zarr.create_array(self.handle.store, name=path, shape=data.shape, dtype=data.dtype,
                                    chunks=chunk_shape, shards=shards, compressors=[*codec, Crc32cCodec()],
                                    config=_EVERY_CHUNK)
            arr[...] = data
        if attrs:
            arr.attrs.update({k: jsonable(v) for k, v in attrs.items()})

    def allocate(self, name: str, shape: tuple[int, ...], dtype: Any, *, chunks: tuple[int, ...],
                 compress: bool = True):
        """An empty numeric array ``name`` of ``shape``, chunked by ``chunks``, with :meth:`create`'s codecs and
        checksums, to be filled by slices (``arr[lo:hi] = block``: a slice covering whole chunks writes each
        chunk once). Returns the h5py dataset or zarr array."""
        dtype = np.dtype(dtype)
        chunks = tuple(max(1, min(c, s)) for c, s in zip(chunks, shape))
        if self.backend == "h5":
            kw = {"chunks": chunks, **_h5_filters(dtype, compress, "lz4")} if 0 not in shape else {}
            return self.handle.create_dataset(name, shape=shape, dtype=dtype, **kw)
        import zarr
        from zarr.codecs import Crc32cCodec

        return zarr.create_array(self.handle.store, name=f"{self.handle.path}/{name}".lstrip("/"), shape=shape,
                                 dtype=dtype, chunks=chunks, compressors=[*_zarr_codecs(dtype, compress, "lz4"),
                                                                         Crc32cCodec()], config=_EVERY_CHUNK)

    def set_attrs(self, attrs: Mapping[str, Any]) -> None:
        if self.backend == "h5":
            for k, v in attrs.items():
                self.handle.attrs[k] = json.dumps(jsonable(v))
        else:
            self.handle.attrs.update({k: jsonable(v) for k, v in attrs.items()})

    # -- reading --
    @property
    def attrs(self) -> dict[str, Any]:
        if self.backend == "h5":
            return {k: json.loads(v) for k, v in self.handle.attrs.items()}
        return dict(self.handle.attrs)

    def __contains__(self, name: str) -> bool:
        if self.backend == "h5":
            return name in self.handle
        try:
            self.handle[name]
            return True
        except KeyError:
            return False

    def __getitem__(self, name: str):
        """The named array (h5py.Dataset or zarr.Array): slice it to read."""
        try:
            return self.handle[name]
        except KeyError:
            raise KeyError(f"no array {name!r} in {self.handle}") from None

    def close(self) -> None:
        if self.backend == "h5":
            self.handle.close()


def _h5_filters(dtype: np.dtype, compress: bool, compression: str) -> dict[str, Any]:
    """h5py ``create_dataset`` keywords of a non-empty array: LZF (``lz4``) or gzip (``zstd``), fletcher32."""
    kw: dict[str, Any] = {}
    if compress:
        kw["compression"] = "lzf" if compression == "lz4" else "gzip"
        if compression == "zstd":
            kw["compression_opts"] = 6
    if np.dtype(dtype).kind not in "USO":
        kw["fletcher32"] = True
    return kw


def _zarr_codecs(dtype: np.dtype, compress: bool, compression: str) -> list:
    """The compressors of a numeric Zarr array before its crc32c: Blosc-LZ4 + (bit)shuffle or Zstandard."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if not compress:
        return []
    if compression == "zstd":
        return [ZstdCodec(level=5)]
    return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle" if np.dtype(dtype) == np.uint8 else "shuffle")]


def _open_container(path: Path, backend: str, mode: str) -> _Container:
    if backend == "h5":
        import h5py

        # HDF5 1.8 file format (or later) when writing: dense attribute storage (a long video's JPEG offsets
        # exceed the 64 KiB of a compact attribute) and checksummed object headers.
        kw = {"libver": ("v108", "latest")} if mode != "r" else {}
        return _Container("h5", h5py.File(path, mode, **kw), Path(path))
    import zarr

    return _Container("zarr", zarr.open_group(str(path), mode=mode, zarr_format=3), Path(path))


@contextmanager
def reading(path: Path | None, what: str) -> Iterator[None]:
    """Turn a failed chunk read (checksum mismatch, truncated or undecodable chunk) into a StoreError naming
    the file and the array."""
    try:
        yield
    except StoreError as e:
        if path is None or str(path) in str(e):
            raise
        raise type(e)(f"{path}: {e}") from e  # e.g. a JPEG OpenCV cannot decode: name the file
    except (IndexError, KeyError):
        raise
    except Exception as e:  # noqa: BLE001 - zarr / numcodecs / h5py raise ValueError, OSError, RuntimeError
        raise StoreError(f"{path}: corrupt or truncated data in {what!r} ({type(e).__name__}: {str(e)[:200]}); "
                         "`pipeline verify` lists the damaged videos, re-running the stage recomputes them") from e


def missing_chunks(c: "_Container", name: str) -> list[str]:
    """The chunks of array ``name`` absent on disk, each naming its file: a Zarr chunk (or shard) file that is
    gone reads back as the fill value (zeros) without an error, so a deleted chunk is found only by looking for
    its file; in HDF5, chunks never allocated. Empty when every chunk the array's shape needs is there."""
    return [f"{where}: missing data of {name!r} ({what})" for where, what, _ in _absent_chunks(c, name)]


def _absent_chunks(c: "_Container", name: str) -> list[tuple[Path, str, tuple[int, int] | None]]:
    """(file, what, rows along axis 0 or None for "somewhere") of every absent chunk of array ``name``."""
    arr = c.handle[name]
    shape = tuple(int(x) for x in arr.shape)
    if c.backend == "h5":
        if arr.chunks is None or not all(shape):
            return []
        expected = int(np.prod([-(-s // k) for s, k in zip(shape, arr.chunks)]))
        stored = arr.id.get_num_chunks()
        return [(Path(c.path), f"{expected - stored} of {expected} chunks never stored", None)] \
            if stored < expected else []
    import itertools

    outer = tuple(arr.metadata.chunk_grid.chunk_shape)  # the shard shape of a sharded array: one file each
    encode = arr.metadata.chunk_key_encoding.encode_chunk_key
    folder = Path(c.path) / arr.path
    out = []
    for coords in itertools.product(*(range(-(-s // k)) for s, k in zip(shape, outer))):
        f = folder / encode(coords)
        if not f.exists():
            rows = (coords[0] * outer[0], min(shape[0], (coords[0] + 1) * outer[0])) if shape else None
            out.append((f, "the file is gone: it would read as zeros", rows))
    return out


def array_names(c: "_Container") -> list[str]:
    """Every array of an open container, by path (``frames/jpeg``, ``streams/rgb``, ``labels``)."""
    names: list[str] = []
    if c.backend == "h5":
        import h5py

        c.handle.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    else:
        names = sorted(n for n, _ in c.handle.arrays()) + [f"{g}/{n}" for g, grp in sorted(c.handle.groups())
                                                            for n, _ in grp.arrays()]
    return names


def check_arrays(c: "_Container", sequences: Mapping[str, str] | None = None) -> list[str]:
    """Every problem of an open container, each naming the array: an image sequence it must hold that is absent
    (``sequences``: name -> the attribute counting its images, e.g. ``{"frames": "num_frames"}``) or shorter
    than that count; a chunk file missing (:func:`missing_chunks`); an array that cannot be read in full (each
    chunk's checksum is verified on read). Empty when all is well."""
    names = array_names(c)
    problems = []
    for name, count in (sequences or {}).items():
        if not any(n in names for n in (f"{name}/jpeg", f"{name}/raw")):
            problems.append(f"no image sequence {name!r} ({name}/jpeg or {name}/raw): missing data")
            continue
        try:
            n = c.num_images(name) if isinstance(c, ContainerReader) and count in c.attrs else None
        except StoreError:
            n = None  # damaged offsets: reported below
        if n is not None and n != int(c.attrs[count]):
            problems.append(f"{name}: {n} images stored, its {count} attribute says {c.attrs[count]}")
    for name in names:
        missing = missing_chunks(c, name)
        if missing:
            problems.append(f"{name}: {len(missing)} chunk file(s) missing ({missing[0]})")
            continue
        arr = c.handle[name]
        try:
            step = max(1, int(arr.chunks[0])) if arr.chunks and arr.ndim else 1
            for a in range(0, max(1, arr.shape[0]) if arr.ndim else 1, step):
                arr[a:a + step] if arr.ndim else arr[()]
        except Exception as e:  # noqa: BLE001 - any failed read is a damaged array
            problems.append(f"{name}: {type(e).__name__}: {str(e)[:160]}")
    if isinstance(c, ContainerReader):  # a JPEG sequence's offsets (attributes: no chunk checksum) by their CRC
        for name in names:
            if name.endswith("/jpeg"):
                try:
                    c._jpeg_sequence(name[:-len("/jpeg")])
                except StoreError as e:
                    problems.append(f"{name}: {str(e)[:200]}")
    return problems


class ContainerWriter(_Container):
    """What :meth:`VideoStore.writer` yields: create arrays and image sequences, set attributes."""

    def write_images(self, name: str, frames: np.ndarray, *, codec: str = "jpeg", quality: int = 95) -> None:
        """Store an image sequence (T, H, W, C) uint8 as ``<name>/jpeg`` (offsets in its attributes) or
        ``<name>/raw``.

        ``jpeg``: colour (C = 3) or gray (C = 1) frames are one JPEG each; any other C (flow: 2) is one
        grayscale JPEG per channel (``planes`` = C, an attribute of ``<name>/jpeg``). ``raw`` / ``zstd``:
        lossless, one frame per chunk.
        """
        if codec not in IMAGE_CODECS:
            raise ValueError(f"unknown image codec {codec!r}; choose one of {', '.join(IMAGE_CODECS)}")
        if frames.ndim == 3:
            frames = frames[..., None]
        if codec == "jpeg":
            if frames.shape[-1] in (1, 3):
                self._write_jpeg(name, *encode_jpeg_frames(frames, quality), planes=1)
            else:
                self._write_jpeg(name, *encode_jpeg_planes(frames, quality), planes=frames.shape[-1])
        else:
            self.create(f"{name}/raw", frames, chunks=(1, *frames.shape[1:]),
                        compression="zstd" if codec == "zstd" else "lz4", shard=True)

    def write_encoded_images(self, name: str, images: Sequence[bytes], *, planes: int = 1) -> None:
        """Store already-encoded JPEG images as ``<name>/jpeg`` (offsets in its attributes), bytes copied as they are
        (no re-encoding; the same layout :meth:`write_images` writes with ``codec="jpeg"``). ``planes`` > 1:
        the images are grayscale channel planes, frame-major (flow: x0, y0, x1, y1, ...)."""
        if len(images) % planes:
            raise ValueError(f"{len(images)} images is not a multiple of {planes} planes")
        self._write_jpeg(name, *_concat_images(images), planes=planes)

    def _write_jpeg(self, name: str, data: np.ndarray, offsets: np.ndarray, *, planes: int) -> None:
        self.create(f"{name}/jpeg", data, chunks=(1 << 20,), compress=False, shard=True)
        offsets = np.asarray(offsets, dtype="<i8")
        # Native attributes, not create()'s JSON text: in HDF5 attrs["offsets"] is an int64 array.
        self.handle[f"{name}/jpeg"].attrs.update({
            "offsets": offsets if self.backend == "h5" else offsets.tolist(),
            "planes": int(planes), "offsets_crc32": zlib.crc32(offsets.tobytes())})


class ContainerReader(_Container):
    """A read-only open container. Arrays and a JPEG sequence's offsets are looked up once per reader."""

    def __init__(self, backend: str, handle: Any, path: Path | None = None):
        super().__init__(backend, handle, path)
        self._arrays: dict[str, Any] = {}
        self._jpeg: dict[str, tuple[Any, np.ndarray, int]] = {}

    def _array(self, name: str):
        """Array ``name`` or None; a Zarr array is opened directly, without walking its parent groups."""
        if name not in self._arrays:
            if self.backend == "h5":
                self._arrays[name] = self.handle.get(name)
            else:
                import zarr

                path = f"{self.handle.path}/{name}".lstrip("/")
                try:
                    self._arrays[name] = zarr.open_array(self.handle.store, path=path, mode="r", zarr_format=3)
                except (KeyError, FileNotFoundError, zarr.errors.NodeTypeValidationError,
                        getattr(zarr.errors, "ArrayNotFoundError", KeyError)):
                    self._arrays[name] = None
        return self._arrays[name]

    def __getitem__(self, name: str):
        arr = self._array(name)
        if arr is None:
            raise MissingArray(f"{self.path}: no array {name!r}")
        return arr

    def __contains__(self, name: str) -> bool:
        return self._array(name) is not None

    def image_codec(self, name: str) -> str:
        if f"{name}/jpeg" in self:
            return "jpeg"
        if f"{name}/raw" in self:
            return "raw"
        raise MissingArray(f"{self.path}: no image sequence {name!r} ({name}/jpeg or {name}/raw): missing data; "
                           "`pipeline verify` lists the videos with missing data, re-running the stage recomputes "
                           "them")

    def _jpeg_sequence(self, name: str) -> tuple[Any, np.ndarray, int]:
        """(bytes array, (T * planes + 1,) int64 offsets, planes) of a JPEG-in-array sequence; the offsets
        are checked against their CRC-32 and the array's length (format 2: read from ``<name>/offsets``)."""
        if name not in self._jpeg:
            data = self[f"{name}/jpeg"]
            attrs = data.attrs
            if "offsets" in attrs:  # format 3
                offsets = np.asarray(attrs["offsets"], dtype="<i8").reshape(-1)
                crc = int(attrs["offsets_crc32"])
                if zlib.crc32(offsets.tobytes()) != crc:
                    raise StoreError(f"{self.path}: the offsets of {name!r}/jpeg do not match their CRC-32 "
                                     "(damaged metadata); `pipeline verify` lists the damaged videos, re-running "
                                     "the stage recomputes them")
                planes = int(attrs["planes"])
            else:  # format 2: an offsets array, planes (HDF5: JSON text) in its attributes when not 1
                off = self[f"{name}/offsets"]
                with reading(self.path, f"{name}/offsets"):
                    offsets = np.asarray(off[...], dtype=np.int64)
                planes = off.attrs.get("planes", 1)
                planes = int(json.loads(planes) if isinstance(planes, (str, bytes)) else planes)
            if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != data.shape[0] or (len(offsets) - 1) % planes:
                raise StoreError(f"{self.path}: the offsets of {name!r} do not describe its {data.shape[0]} bytes "
                                 f"of {planes}-plane JPEG images (damaged metadata)")
            self._jpeg[name] = (data, offsets, planes)
        return self._jpeg[name]

    def jpeg_planes(self, name: str) -> int:
        """JPEG images per frame of a JPEG-in-array sequence (1; flow stored as x / y images: 2)."""
        return self._jpeg_sequence(name)[2]

    def num_images(self, name: str) -> int:
        if self.image_codec(name) == "jpeg":
            _, offsets, planes = self._jpeg_sequence(name)
            return (len(offsets) - 1) // planes
        return int(self[f"{name}/raw"].shape[0])

    def jpeg_block(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A JPEG-in-array sequence read in full: (N,) uint8 concatenated JPEG bytes and the (images + 1,)
        int64 offsets of its images (planes frame-major), the form :func:`decode_jpeg_frames` takes."""
        arr, offsets, _ = self._jpeg_sequence(name)
        with reading(self.path, name):
            return np.asarray(arr[...]), offsets

    def encoded_images(self, name: str) -> list[bytes]:
        """The stored JPEG bytes of a JPEG-in-array sequence, every image in order (planes frame-major)."""
        data, offsets = self.jpeg_block(name)
        return [data[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]

    def read_images(self, name: str, indices: Sequence[int] | None = None, *, device: str = "cpu"):
        """Frames ``indices`` (all when None) as a (k, H, W, C) uint8 torch tensor (on ``device``); a damaged
        chunk is a StoreError naming the file.

        Each run of nearby indices is one contiguous read (a gap of at most the run's own length is read
        through rather than split); repeated indices are read once.
        """
        with reading(self.path, name):
            return self._read_images(name, indices, device)

    def _read_images(self, name: str, indices: Sequence[int] | None, device: str):
        import torch

        n = self.num_images(name)
        idx = list(range(n)) if indices is None else [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise IndexError(f"frame indices {bad[:5]} out of range for {n} images")
        uniq = sorted(set(idx))
        runs = contiguous_runs(uniq)
        if self.image_codec(name) == "jpeg":
            data, offsets, P = self._jpeg_sequence(name)
            bufs: list[np.ndarray] = []
            offs = [0]
            for a, b in runs:  # frames [a, b): images [a * P, b * P)
                lo, hi = int(offsets[a * P]), int(offsets[b * P])
                bufs.append(np.asarray(data[lo:hi]))
                for j in range(a * P, b * P):
                    offs.append(offs[-1] + int(offsets[j + 1] - offsets[j]))
            pos = {u: k for k, u in enumerate(u for a, b in runs for u in range(a, b))}
            return decode_jpeg_frames(np.concatenate(bufs), np.asarray(offs), [pos[i] for i in idx],
                                      device=device, planes=P)
        arr = self[f"{name}/raw"]
        block = np.concatenate([np.asarray(arr[a:b]) for a, b in runs])
        pos = {u: k for k, u in enumerate(u for a, b in runs for u in range(a, b))}
        out = torch.from_numpy(np.ascontiguousarray(block[[pos[i] for i in idx]]))
        return out.to(device) if device != "cpu" else out


def contiguous_runs(sorted_indices: Sequence[int]) -> list[tuple[int, int]]:
    """Half-open ranges covering sorted unique indices, merging a gap no longer than the run before it
    (reading a few unneeded frames costs less than another read call)."""
    runs: list[list[int]] = []
    for i in sorted_indices:
        if runs and i - runs[-1][1] <= max(1, runs[-1][1] - runs[-1][0]):
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs]


@dataclass
class VideoStore:
    """A folder of per-video containers: ``root/<video_id>.zarr`` or ``root/<video_id>.h5``.

    Video ids may contain ``/`` (``Class/v_Class_g01_c01``); they map to sub-folders.
    """

    root: Path
    backend: str = "zarr"

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        _check_backend(self.backend)

    def path(self, video_id: str) -> Path:
        if not video_id or video_id.startswith("/") or ".." in video_id.split("/"):
            raise ValueError(f"invalid video id {video_id!r}")
        return self.root / (video_id + _EXT[self.backend])

    def exists(self, video_id: str) -> bool:
        return self.path(video_id).exists()

    def video_ids(self) -> list[str]:
        """Every committed video in the store (temporary, unfinished containers are not listed)."""
        ext = _EXT[self.backend]
        found: list[str] = []

        def walk(folder: Path, prefix: str) -> None:
            for entry in os.scandir(folder):
                if entry.name.startswith(TMP_PREFIX):
                    continue
                if entry.name.endswith(ext):
                    found.append(prefix + entry.name[: -len(ext)])
                elif entry.is_dir():
                    walk(Path(entry.path), prefix + entry.name + "/")

        if self.root.is_dir():
            walk(self.root, "")
        return sorted(found)

    @contextmanager
    def writer(self, video_id: str) -> Iterator[ContainerWriter]:
        """Write one video's container atomically: a temporary sibling renamed into place on success.

        An exception inside the block removes the temporary container and leaves any existing one untouched.
        """
        with atomic_dir(self.path(video_id)) as tmp:
            raw = _open_container(tmp, self.backend, "w")
            w = ContainerWriter(raw.backend, raw.handle, tmp)
            try:
                yield w
                w.set_attrs({"format_version": FORMAT_VERSION, "video_id": video_id})
            finally:
                w.close()

    @contextmanager
    def reader(self, video_id: str) -> Iterator[ContainerReader]:
        path = self.path(video_id)
        if not path.exists():
            raise StoreError(f"{path}: no stored data for video {video_id!r}")
        try:
            raw = _open_container(path, self.backend, "r")
        except Exception as e:  # noqa: BLE001 - report any backend failure with the path
            raise StoreError(f"{path}: cannot open ({type(e).__name__}: {e})") from e
        r = ContainerReader(raw.backend, raw.handle, path)
        try:
            version = r.attrs.get("format_version")
            if version not in READABLE_FORMATS:
                raise StoreError(f"{path}: written by store format {version}, this pipeline reads formats "
                                 f"{', '.join(map(str, READABLE_FORMATS))}; re-run the stage that wrote it with "
                                 "--force (or use another --cache-dir)")
            yield r
        finally:
            r.close()

    def clean_temporary(self) -> int:
        """Remove containers left under temporary names by a killed run; returns how many."""
        if not self.root.is_dir():
            return 0
        stale = [p for p in self.root.rglob(TMP_PREFIX + "*")]
        for p in stale:
            remove_path(p)
        return len(stale)


# ----------------------------------------------------------------------------------------------------------
# Frames: a VideoStore whose containers hold "frames" plus metadata
# ----------------------------------------------------------------------------------------------------------

def read_frames(store: VideoStore, video_id: str, indices: Sequence[int] | None = None, *, device: str = "cpu"):
    """Decoded RGB frames of a video as a (k, H, W, 3) uint8 torch tensor."""
    with store.reader(video_id) as r:
        return r.read_images("frames", indices, device=device)


# ----------------------------------------------------------------------------------------------------------
# Features: one consolidated container for every video
# ----------------------------------------------------------------------------------------------------------

@dataclass
class FeatureSet:
    """Everything a feature store holds, in memory.

    streams: name -> (V, P, views, D) array (float16 by default); positions: (V, P) float32 frame positions;
    video_ids, split, groups: (V,) str; labels: (V,) int64; class_names: (C,) str; attrs: JSON metadata.
    """

    streams: dict[str, np.ndarray]
    positions: np.ndarray
    video_ids: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    groups: np.ndarray
    class_names: np.ndarray
    attrs: dict[str, Any]


def feature_store_path(folder: Path, backend: str) -> Path:
    return Path(folder) / ("features" + _EXT[_check_backend(backend)])


def write_feature_store(path: Path, fs: FeatureSet) -> None:
    """Write a FeatureSet atomically to ``path`` (backend from the suffix: ``.zarr`` or ``.h5``)."""
    V = len(fs.video_ids)
    for name, arr in fs.streams.items():
        if arr.ndim != 4 or arr.shape[0] != V:
            raise ValueError(f"stream {name!r}: expected (V={V}, P, views, D), got {arr.shape}")
    with feature_store_writer(path, video_ids=fs.video_ids, labels=fs.labels, split=fs.split, groups=fs.groups,
                              class_names=fs.class_names, attrs=fs.attrs,
                              streams={s: (a.shape[1:], a.dtype) for s, a in fs.streams.items()},
                              num_positions=fs.positions.shape[1]) as w:
        for lo in range(0, V, w.chunk_rows):
            w.write(lo, {s: a[lo:lo + w.chunk_rows] for s, a in fs.streams.items()},
                    fs.positions[lo:lo + w.chunk_rows])


#: Target bytes per feature chunk: a few videos' (P, views, D) blocks, so reading one video decompresses
#: little (256 videos of 45 x 10 x 2048 float16 would be a 470 MB chunk).
FEATURE_CHUNK_BYTES = 8 << 20


def feature_chunk_rows(shapes: Mapping[str, tuple[tuple[int, ...], Any]], num_videos: int) -> int:
    """Videos per chunk of a feature store whose streams are ``{name: ((P, views, D), dtype)}``: as many as fit
    in :data:`FEATURE_CHUNK_BYTES` in the widest stream (at least 1, at most ``num_videos``)."""
    per_video = max([int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in shapes.values()] or [1])
    return max(1, min(num_videos, FEATURE_CHUNK_BYTES // max(1, per_video)))


class FeatureStoreWriter:
    """The open feature store of :func:`feature_store_writer`: stream rows are written block by block."""

    def __init__(self, w: ContainerWriter, shapes: Mapping[str, tuple[tuple[int, ...], Any]], num_videos: int,
                 num_positions: int):
        self.num_videos = num_videos
        #: Videos per chunk: a block of this many rows starting at a multiple of it writes whole chunks, once.
        self.chunk_rows = feature_chunk_rows(shapes, num_videos)
        self.shapes = {s: tuple(int(x) for x in shape) for s, (shape, _) in shapes.items()}
        self._streams = {s: w.allocate(f"streams/{s}", (num_videos, *shape), dtype,
                                       chunks=(self.chunk_rows, *shape)) for s, (shape, dtype) in shapes.items()}
        self._positions = w.allocate("positions", (num_videos, num_positions), np.float32,
                                     chunks=(self.chunk_rows, num_positions))

    def write(self, lo: int, streams: Mapping[str, np.ndarray], positions: np.ndarray) -> None:
        """Rows ``lo .. lo + n - 1`` of every stream (``{name: (n, P, views, D)}``) and of ``positions`` (n, P)."""
        n = len(positions)
        if set(streams) != set(self._streams) or lo < 0 or lo + n > self.num_videos:
            raise ValueError(f"rows {lo}..{lo + n - 1} of streams {sorted(streams)}: the store holds "
                             f"{self.num_videos} videos of streams {sorted(self._streams)}")
        for s, block in streams.items():
            if block.shape != (n, *self.shapes[s]):
                raise ValueError(f"stream {s!r}: expected ({n}, {', '.join(map(str, self.shapes[s]))}), "
                                 f"got {block.shape}")
            self._streams[s][lo:lo + n] = block
        self._positions[lo:lo + n] = np.asarray(positions, np.float32)


@contextmanager
def feature_store_writer(path: Path, *, video_ids: Sequence[str], labels: Sequence[int], split: Sequence[str],
                         groups: Sequence[str], class_names: Sequence[str], attrs: Mapping[str, Any],
                         streams: Mapping[str, tuple[tuple[int, ...], Any]],
                         num_positions: int) -> Iterator[FeatureStoreWriter]:
    """Write a feature store (``.zarr`` or ``.h5`` by the suffix) block by block of videos, atomically.

    The per-video tables (ids, labels, split, groups) and the class names are written first; the block yields a
    :class:`FeatureStoreWriter` whose ``write(lo, streams, positions)`` fills rows of the streams
    (``{name: ((P, views, D), dtype)}``) and positions; the attributes are set last. The store is built under a
    temporary name and renamed into place when the block ends: an exception removes it, a killed process leaves
    only the temporary (``.tmp-<pid>-features.*``). Memory holds what the caller writes, one block at a time.
    """
    path = Path(path)
    backend = "zarr" if path.suffix == ".zarr" else "h5" if path.suffix == ".h5" else None
    if backend is None:
        raise ValueError(f"{path}: feature store name must end in .zarr or .h5")
    for name, (shape, _) in streams.items():
        if len(shape) != 3:
            raise ValueError(f"stream {name!r}: expected rows of (P, views, D), got {tuple(shape)}")
    V = len(video_ids)
    with atomic_dir(path) as tmp:
        c = _open_container(tmp, backend, "w")
        w = ContainerWriter(c.backend, c.handle)
        try:
            w.create("labels", np.asarray(labels).astype(np.int64))
            for key, values in (("video_ids", video_ids), ("split", split), ("groups", groups),
                                ("class_names", class_names)):
                # HDF5: UTF-8 encoded bytes; Zarr: variable-length UTF-8 strings.
                text = np.asarray(values).astype(str)
                w.create(key, np.char.encode(text, "utf-8") if backend == "h5" else text, compress=False)
            out = FeatureStoreWriter(w, streams, V, num_positions)
            yield out
            w.set_attrs({**attrs, "format_version": FORMAT_VERSION, "streams": list(streams)})
        finally:
            w.close()


def open_feature_store(path: Path, *, check_format: bool = False) -> "ContainerReader":
    """A feature store (``.zarr`` or ``.h5`` by its suffix) opened for reading; StoreError naming the file when
    it is absent or (``check_format``) written by a store format this pipeline cannot read."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: feature store not found (run `pipeline extract-features` first)")
    c = _open_container(path, "zarr" if path.suffix == ".zarr" else "h5", "r")
    r = ContainerReader(c.backend, c.handle, c.path)
    if check_format and r.attrs.get("format_version") not in READABLE_FORMATS:
        version = r.attrs.get("format_version")
        r.close()
        raise StoreError(f"{path}: written by store format {version}, this pipeline reads formats "
                         f"{', '.join(map(str, READABLE_FORMATS))}; re-run extract-features")
    return r


def decode_strings(a) -> np.ndarray:
    """A stored string array as ``str`` (HDF5 holds UTF-8 bytes, Zarr variable-length strings)."""
    a = np.asarray(a)
    if a.dtype.kind == "S":
        return np.char.decode(a, "utf-8")
    return np.array([str(x) for x in a.ravel()]).reshape(a.shape)


def feature_store_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the streams of a feature store, (V, P, views, D) each, without reading the arrays."""
    r = open_feature_store(path)
    try:
        return {s: tuple(int(x) for x in r[f"streams/{s}"].shape) for s in r.attrs.get("streams", [])}
    finally:
        r.close()


def read_feature_store(path: Path, streams: Sequence[str] | None = None, *, damaged: str = "raise") -> FeatureSet:
    """Load a feature store written by :func:`write_feature_store` (or by ``extract-features``).

    ``damaged``: a stream chunk failing its checksum is a StoreError naming the file (``"raise"``), or
    (``"mark"``) its rows are NaN and ``attrs["damaged"]`` maps each of their video ids to the reason, so a
    caller can fail those videos and keep the others.
    """
    path = Path(path)
    r = open_feature_store(path, check_format=True)
    try:
        attrs = r.attrs
        names = list(attrs["streams"]) if streams is None else list(streams)
        missing = [s for s in names if s not in attrs["streams"]]
        if missing:
            raise StoreError(f"{path}: no stream(s) {missing}; it holds {attrs['streams']}")

        def strings(key: str) -> np.ndarray:
            return decode_strings(r[key][...])

        ids = strings("video_ids")
        bad: dict[str, str] = {}
        with reading(path, "streams"):
            if damaged == "raise":
                streams = {s: np.asarray(r[f"streams/{s}"][...]) for s in names}
            else:
                streams = {s: _read_marking(r[f"streams/{s}"], f"streams/{s}", path, ids, bad) for s in names}
        if bad:
            attrs = {**attrs, "damaged": bad}
        return FeatureSet(
            streams=streams,
            positions=np.asarray(r["positions"][...]),
            video_ids=ids, labels=np.asarray(r["labels"][...]),
            split=strings("split"), groups=strings("groups"), class_names=strings("class_names"),
            attrs=attrs,
        )
    finally:
        r.close()


def feature_chunks(arr) -> Iterator[tuple[int, int, np.ndarray | Exception]]:
    """``(lo, hi, rows lo .. hi - 1)`` of a stored array, one chunk of rows (axis 0) at a time; a chunk that
    cannot be read (checksum mismatch, truncated chunk) comes as the exception instead of its rows. Memory holds
    one chunk."""
    step = max(1, int(arr.chunks[0])) if arr.chunks else max(1, arr.shape[0])
    for lo in range(0, arr.shape[0], step):
        hi = min(lo + step, arr.shape[0])
        try:
            block = np.asarray(arr[lo:hi])
        except Exception as e:  # noqa: BLE001 - zarr / numcodecs / h5py raise ValueError, OSError, RuntimeError
            block = e
        yield lo, hi, block


def damaged_chunk_reason(path: Path, key: str, lo: int, hi: int, e: Exception) -> str:
    """Why the videos of rows ``lo .. hi - 1`` of a feature store are damaged (names the file and the array)."""
    return f"{path}: damaged chunk of {key}, rows {lo}-{hi - 1} ({type(e).__name__}: {str(e)[:120]})"


def _read_marking(arr, key: str, path: Path, ids: Sequence[str], bad: dict[str, str]) -> np.ndarray:
    """Read ``arr`` chunk by chunk along axis 0; a chunk that fails is NaN, its videos noted in ``bad``."""
    out = np.empty(arr.shape, arr.dtype)
    for lo, hi, block in feature_chunks(arr):
        if isinstance(block, Exception):
            out[lo:hi] = np.nan
            for vid in ids[lo:hi]:
                bad.setdefault(str(vid), damaged_chunk_reason(path, key, lo, hi, block))
        else:
            out[lo:hi] = block
    return out


#: The arrays every feature store holds besides one ``streams/<name>`` per stream its ``streams`` attribute lists.
FEATURE_ARRAYS = ("positions", "labels", "video_ids", "split", "groups", "class_names")


def damaged_feature_videos(path: Path, expected: Sequence[str] = ()) -> dict[str, str]:
    """Videos of a feature store with damaged or missing data, video id -> reason naming the file: rows in a
    chunk that fails its checksum (or is truncated) or whose file is gone (it would read as zeros), every video
    when an array the store must hold (:data:`FEATURE_ARRAYS`, each stream) is absent, and each video of
    ``expected`` (the journal's) absent from its ids. Every array is read chunk by chunk. When the ids
    themselves are missing or unreadable, every ``expected`` video is listed (``*`` without ``expected``)."""
    path = Path(path)
    r = open_feature_store(path)
    bad: dict[str, str] = {}
    try:
        names = set(array_names(r))
        required = [*FEATURE_ARRAYS, *[f"streams/{s}" for s in r.attrs.get("streams", [])]]
        try:
            gone = _absent_chunks(r, "video_ids") if "video_ids" in names else [(path, "array 'video_ids' missing",
                                                                                   None)]
            if gone:
                raise StoreError(f"{gone[0][0]}: {gone[0][1]}")
            ids = decode_strings(r["video_ids"][...]).ravel().tolist()
        except Exception as e:  # noqa: BLE001 - without ids no video can be named
            why = f"{path}: video_ids missing or unreadable ({type(e).__name__}: {e})"
            return {v: why for v in expected} if expected else {"*": why}
        known = set(ids)
        for vid in expected:
            if vid not in known:
                bad[vid] = f"{path}: no features for this video (absent from video_ids)"
        for key in required:
            if key not in names:
                for vid in ids:
                    bad.setdefault(vid, f"{path}: array {key!r} missing")
                continue
            per_video = key != "class_names"  # class_names has a row per class: all videos need it
            for where, what, rows in _absent_chunks(r, key):
                lo, hi = rows if rows and per_video else (0, len(ids))
                for vid in ids[lo:hi]:
                    bad.setdefault(vid, f"{where}: {key} rows {lo}-{hi - 1}: {what}")
            for lo, hi, block in feature_chunks(r[key]):
                if isinstance(block, Exception):  # a damaged chunk damages the videos in it
                    for vid in (ids[lo:hi] if per_video else ids):
                        bad.setdefault(vid, damaged_chunk_reason(path, key, lo, hi, block))
    finally:
        r.close()
    return bad
