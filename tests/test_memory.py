"""Memory budgets (pipeline.memory): sizes by hand, the default against /proc/meminfo."""
from pathlib import Path

import pytest

from pipeline import memory


@pytest.mark.parametrize("text, bytes_", [("2G", 2 * 1024 ** 3), ("512M", 512 * 1024 ** 2), ("1.5GiB", 1610612736),
                                          ("300000", 300000), ("64k", 65536), ("2gb", 2 * 1024 ** 3),
                                          (" 1T ", 1024 ** 4), (".5M", 524288)])
def test_parse_size_by_hand(text, bytes_):
    assert memory.parse_size(text) == bytes_


@pytest.mark.parametrize("text", ["lots", "2X", "-1G", "", "1.2.3G", "G"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError, match="not a size"):
        memory.parse_size(text)
    assert "not a size" in memory.size_problem(text)


def test_size_problem_accepts_auto_and_refuses_zero():
    assert memory.size_problem("auto") is None and memory.size_problem("AUTO") is None
    assert memory.size_problem("1K") is None
    assert memory.size_problem("0") == "must be more than 0 bytes"


def test_auto_budget_is_half_the_available_memory(monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 10_000)
    assert memory.memory_budget("auto") == 5_000 and memory.memory_budget("2K") == 2048
    monkeypatch.setattr(memory, "available_memory", lambda: None)
    assert memory.memory_budget("auto") == memory.FALLBACK_BYTES


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="no /proc/meminfo")
def test_available_memory_reads_meminfo():
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
    expected = int(line.split()[1]) * 1024
    assert memory.available_memory() == pytest.approx(expected, rel=0.2)


def test_format_size():
    assert memory.format_size(3 << 30) == "3 GiB" and memory.format_size(1536 << 20) == "1.5 GiB"
    assert memory.format_size(10) == "10 B" and memory.format_size(2048) == "2 KiB"
