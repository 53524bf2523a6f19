"""Interoperability with other tools' files (rawframes trees of mmaction2 / TSN / denseflow / twostreamfusion)."""
