"""Writing to a Trainer's loggers: the scalars to every logger; histograms, text, the custom-scalars layout and images
to those whose ``experiment`` is a TensorBoard ``SummaryWriter``, a logged step's scalars and histograms as one event.

A torch ``SummaryWriter`` of a logger without a tag prefix takes a step's scalars and histograms as one ``Summary``
handed to its event file writer (``add_scalar`` would cost one hand-off to the writer thread per tag), and its event
file is checksummed in C (:func:`checksum_in_c`), that writer only. Another writer (``tensorboardX``, a prefixed
logger) takes ``log_metrics`` and ``add_histogram_raw``. Imports neither Lightning nor TensorBoard at import time.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._compat import event_file_writer, metric_prefix, record_file, record_writer
from .histograms import fetch_histograms

__all__ = [
    "LogTarget",
    "checksum_in_c",
    "find_targets",
    "make_summary",
    "write_image",
    "write_layout",
    "write_step",
    "write_text",
]


@dataclass
class LogTarget:
    """One logger: where its scalars, histograms and text go."""

    logger: Any
    writer: Any  # a SummaryWriter-like `experiment` (histograms, text, custom scalars), or None
    fast: bool  # a torch SummaryWriter without tag prefix: one event per step through its file writer
    prefix: str  # what the logger puts before the keys of `log_metrics` ("" or "<prefix>-")


def find_targets(loggers: Sequence[Any]) -> tuple[list[LogTarget], list[str]]:
    """``(targets, scalars_only)``: a :class:`LogTarget` per logger, and the class names of the loggers that take
    scalars only (their ``experiment`` has no ``add_histogram_raw``, ``add_text`` and ``add_custom_scalars``).

    Switches the event files of the fast writers to the C CRC32C (:func:`checksum_in_c`).
    """
    targets, scalars_only = [], []
    for logger in loggers:
        writer = getattr(logger, "experiment", None)
        if not all(hasattr(writer, a) for a in ("add_histogram_raw", "add_text", "add_custom_scalars")):
            writer = None
            scalars_only.append(type(logger).__name__)
        prefix = metric_prefix(logger)
        fast = writer is not None and _is_torch_writer(writer) and not prefix
        targets.append(LogTarget(logger, writer, fast, f"{prefix}-" if prefix else ""))
        if fast:
            checksum_in_c(writer)
    return targets, scalars_only


def write_step(
    targets: Sequence[LogTarget],
    metrics: Mapping[str, float],
    hists: Sequence[tuple[Sequence[str], torch.Tensor, torch.Tensor]],
    step: int,
) -> None:
    """Write one logged step: ``metrics`` to every target, the histograms to its writer.

    Args:
        targets: from :func:`find_targets`.
        metrics: scalar tag -> value.
        hists: ``(tags, stats, counts)`` from :func:`~lightning_gradguard.histograms.histograms_counts` (one tag per
            row); brought to the host in one transfer per device (:func:`~lightning_gradguard.histograms.
            fetch_histograms`); a histogram without values is left out.
        step: the step they are written at.
    """
    protos = fetch_histograms([(s, c) for _, s, c in hists])
    tags = [tag for group, _, _ in hists for tag in group]
    named = [(tag, p) for tag, p in zip(tags, protos, strict=True) if p is not None]
    summary = None
    for t in targets:
        file_writer = event_file_writer(t.writer) if t.fast else None
        if file_writer is not None:
            if summary is None:
                summary = make_summary(metrics, named)
            file_writer.add_summary(summary, step)
            continue
        t.logger.log_metrics(dict(metrics), step)
        if t.writer is not None:
            for tag, p in named:
                t.writer.add_histogram_raw(tag, global_step=step, bucket_limits=p["bucket_limit"],
                                           bucket_counts=p["bucket"], **{k: p[k] for k in
                                           ("min", "max", "num", "sum", "sum_squares")})  # fmt: skip


def write_text(targets: Sequence[LogTarget], tag: str, text: str, step: int) -> None:
    """Markdown ``text`` under ``tag`` in TensorBoard's Text tab of every writer."""
    for t in targets:
        if t.writer is not None:
            t.writer.add_text(tag, text, step)


def write_layout(targets: Sequence[LogTarget], layout_for: Callable[[str], dict[str, Any]]) -> None:
    """The custom-scalars layout ``layout_for(prefix)`` to every writer (``prefix``: its logger's tag prefix)."""
    for t in targets:
        if t.writer is not None:
            t.writer.add_custom_scalars(layout_for(t.prefix))


def write_image(targets: Sequence[LogTarget], tag: str, image: Any, step: int) -> None:
    """An ``HWC`` uint8 ``image`` under ``tag`` in TensorBoard's Images tab of every writer that takes images."""
    for t in targets:
        if t.writer is not None and hasattr(t.writer, "add_image"):
            t.writer.add_image(tag, image, step, dataformats="HWC")


def make_summary(metrics: Mapping[str, float], hists: Sequence[tuple[str, dict[str, Any]]]) -> Any:
    """One TensorBoard ``Summary`` holding every scalar and histogram of a step."""
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

    values = [Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()]
    values += [Summary.Value(tag=tag, histo=HistogramProto(**p)) for tag, p in hists]
    return Summary(value=values)


def checksum_in_c(writer: Any) -> bool:
    """Checksum the records of ``writer``'s event file (a ``torch.utils.tensorboard.SummaryWriter``) with the C CRC32C
    of ``google-crc32c``, if it is installed: the same bytes on disk.

    Without TensorFlow, TensorBoard's record writer computes the masked CRC32C of every record in pure Python (about
    12 MB/s, in the writer thread, holding the GIL the training loop needs). This replaces the ``write`` of this
    writer's record writer only (:func:`record_writer`); TensorBoard's module-level ``crc32c``, which every other
    writer and every reader of the process use, stays as it is. Idempotent; returns whether the C implementation is in
    use (``False`` without ``google-crc32c``, or where the writer's internals are not the ones known).
    """
    try:
        import google_crc32c
    except ImportError:  # pragma: no cover - an optional package
        return False
    if getattr(google_crc32c, "implementation", "c") != "c":  # pragma: no cover - its pure-Python fallback
        return False
    records = record_writer(writer)
    file = record_file(records)
    if file is None:
        return False
    if getattr(records.write, "checksum_in_c", False):
        return True
    value = google_crc32c.value

    def masked(data: bytes) -> bytes:  # TensorBoard's `masked_crc32c`, packed as the record format stores it
        crc = value(data)
        return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)

    def write(data: bytes) -> None:  # TensorBoard's `RecordWriter.write`: length, its CRC, the data, its CRC
        data = bytes(data)
        header = struct.pack("<Q", len(data))
        file.write(header + masked(header) + data + masked(data))

    write.checksum_in_c = True  # type: ignore[attr-defined]
    records.write = write
    return True


def _is_torch_writer(writer: Any) -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard not installed
        return False
    return isinstance(writer, SummaryWriter)
