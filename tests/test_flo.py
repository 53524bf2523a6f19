"""Middlebury .flo I/O, the colour wheel, and flow quantisation, against hand-computed values."""
import struct

import numpy as np
import pytest
import torch

from pipeline.flow.flo import FLO_MAGIC, flow_to_color, make_color_wheel, read_flo, write_flo
from pipeline.flow.quantize import dequantize_flow, quantize_flow


def test_read_flo_hand_written_bytes(tmp_path):
    # 3 wide, 2 high; u = 10*row + col, v = -(10*row + col) + 0.5, interleaved per pixel, row-major.
    body = b"".join(struct.pack("<ff", 10 * r + c, -(10 * r + c) + 0.5) for r in range(2) for c in range(3))
    path = tmp_path / "tiny.flo"
    path.write_bytes(b"PIEH" + struct.pack("<ii", 3, 2) + body)
    flow = read_flo(path)
    assert flow.shape == (2, 2, 3) and flow.dtype == np.float32
    np.testing.assert_array_equal(flow[0], [[0, 1, 2], [10, 11, 12]])
    np.testing.assert_array_equal(flow[1], [[0.5, -0.5, -1.5], [-9.5, -10.5, -11.5]])


def test_write_flo_bytes_and_round_trip(tmp_path):
    flow = np.array([[[1.25, -2.0]], [[3.5, 4.0]]], np.float32)  # (2, H=1, W=2)
    path = tmp_path / "out.flo"
    write_flo(path, torch.from_numpy(flow))
    expected = struct.pack("<f", FLO_MAGIC) + struct.pack("<ii", 2, 1) + struct.pack("<ffff", 1.25, 3.5, -2.0, 4.0)
    assert path.read_bytes() == expected
    assert path.read_bytes()[:4] == b"PIEH"
    np.testing.assert_array_equal(read_flo(path), flow)


def test_read_flo_rejects_bad_files(tmp_path):
    bad_magic = tmp_path / "bad.flo"
    bad_magic.write_bytes(struct.pack("<fii", 1.0, 1, 1) + struct.pack("<ff", 0, 0))
    with pytest.raises(ValueError, match="bad.flo.*magic"):
        read_flo(bad_magic)
    truncated = tmp_path / "short.flo"
    truncated.write_bytes(struct.pack("<fii", FLO_MAGIC, 4, 4) + b"\0" * 8)
    with pytest.raises(ValueError, match="short.flo"):
        read_flo(truncated)
    with pytest.raises(ValueError, match=r"\(2, H, W\)"):
        write_flo(tmp_path / "x.flo", np.zeros((3, 4, 4), np.float32))


def test_flyingchairs_gt_is_readable(shared_data):
    flow = read_flo(shared_data / "flow" / "flyingchairs" / "0000000-gt.flo")
    assert flow.shape == (2, 384, 512)
    assert np.isfinite(flow).all()


def test_color_wheel_segments():
    wheel = make_color_wheel()
    assert wheel.shape == (15 + 6 + 4 + 11 + 13 + 6, 3)
    np.testing.assert_array_equal(wheel[0], [255, 0, 0])  # red
    np.testing.assert_array_equal(wheel[1], [255, 17, 0])  # floor(255 / 15)
    np.testing.assert_array_equal(wheel[15], [255, 255, 0])  # yellow
    np.testing.assert_array_equal(wheel[21], [0, 255, 0])  # green
    np.testing.assert_array_equal(wheel[25], [0, 255, 255])  # cyan
    np.testing.assert_array_equal(wheel[36], [0, 0, 255])  # blue
    np.testing.assert_array_equal(wheel[49], [255, 0, 255])  # magenta


@pytest.mark.parametrize(
    "u, v, rgb",
    [
        # +x: atan2(-0, -1) = -pi -> wheel[0], red.
        (1.0, 0.0, (255, 0, 0)),
        # -x: angle 0 -> fk = 27 -> wheel[27] = cyan->blue step 2: G = 255 - floor(2*255/11) = 209.
        (-1.0, 0.0, (0, 209, 255)),
        # +y: angle -1/2 -> fk = 13.5 -> halfway between wheel[13] (255,221,0) and wheel[14] (255,238,0).
        (0.0, 1.0, (255, 229, 0)),
        # -y: angle 1/2 -> fk = 40.5 -> halfway between wheel[40] (78,0,255) and wheel[41] (98,0,255).
        (0.0, -1.0, (88, 0, 255)),
        # zero flow: fully desaturated.
        (0.0, 0.0, (255, 255, 255)),
    ],
)
def test_flow_to_color_known_colours(u, v, rgb):
    flow = np.array([u, v], np.float32).reshape(2, 1, 1)
    assert tuple(flow_to_color(flow, max_flow=1.0)[0, 0]) == rgb


def test_flow_to_color_saturation_and_default_max():
    # Half the max radius along +x: 1 - 0.5 * (1 - col) per channel -> (255, 127, 127).
    flow = np.zeros((2, 1, 2), np.float32)
    flow[0, 0] = [0.5, 1.0]
    img = flow_to_color(flow)  # max_flow defaults to the largest magnitude, 1.0
    assert img.shape == (1, 2, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == (255, 127, 127)
    assert tuple(img[0, 1]) == (255, 0, 0)
    # Beyond max_flow: darkened by 0.75 -> floor(255 * 0.75) = 191.
    assert tuple(flow_to_color(flow, max_flow=0.5)[0, 1]) == (191, 0, 0)
    unknown = np.full((2, 1, 1), np.nan, np.float32)
    assert tuple(flow_to_color(unknown)[0, 0]) == (0, 0, 0)


def test_quantize_hand_computed():
    # q = round(255 * (v + 20) / 40), clipped: v=0 -> 127.5 -> 128 (half to even), v=20 -> 255,
    # v=-20 -> 0, v=1 -> 133.875 -> 134, v=-7.3 -> 80.9625 -> 81, beyond the bound -> 0 / 255.
    flow = torch.tensor([0.0, 20.0, -20.0, 1.0, -7.3, 35.0, -100.0])
    q = quantize_flow(flow)
    assert q.dtype == torch.uint8
    assert q.tolist() == [128, 255, 0, 134, 81, 255, 0]
    # bound 10: v = 2.5 -> 255 * 12.5 / 20 = 159.375 -> 159
    assert quantize_flow(np.array([2.5], np.float32), bound=10).tolist() == [159]


def test_dequantize_hand_computed_and_round_trip_error():
    q = torch.tensor([0, 255, 51], dtype=torch.uint8)
    np.testing.assert_allclose(dequantize_flow(q).numpy(), [-20.0, 20.0, 51 * 40 / 255 - 20], rtol=0, atol=1e-6)
    v = torch.linspace(-20, 20, 1001)
    err = (dequantize_flow(quantize_flow(v)) - v).abs().max().item()
    assert err <= 20 / 255 + 1e-6  # half a quantisation step


def test_quantize_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        quantize_flow(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="bound"):
        quantize_flow(torch.zeros(2), bound=0)
    with pytest.raises(ValueError, match="uint8"):
        dequantize_flow(torch.zeros(2))
