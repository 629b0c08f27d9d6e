"""Calibration data readers for ONNX Runtime's quantizers (its ``CalibrationDataReader`` protocol): feeds keyed
by input name, read batch by batch so a large calibration file is never held in memory as one tensor."""

from __future__ import annotations

import copy
import functools
import logging
import time
from pathlib import Path
from typing import Iterator

from qops.data import data_kind, feature_matrix, onnx_io, read_table
from qops.errors import DataError

log = logging.getLogger(__name__)



class TableCalibrationReader:
    """ONNX Runtime CalibrationDataReader over a calibration file, yielding feeds keyed by input name.

    ``features`` is a list of tabular feature columns or a :class:`~qops.data.DataKind`; a ``.npz`` of arrays
    named like the inputs (the calibrate stage's materialised feeds) is read as such. Parquet is read batch
    by batch (only the kind's columns), so a large calibration file is never held in memory as one tensor.
    Iterable too (GPTQ's data loader iterates a copy).
    """

    def __init__(self, path: str, model_path: str, features, batch_size: int = 64):
        self.path, self.batch_size = str(path), batch_size
        self.inputs = onnx_io(model_path)[0]
        self.features = data_kind(str(model_path), features, self.path)
        self._it: Iterator[dict] | None = None
        self.rows = 0
        self._t0 = self._last = time.monotonic()

    @functools.cached_property
    def total_rows(self) -> int:
        """Rows of the calibration file (parquet: from its metadata, without reading it)."""
        return _count_rows(self.path)

    def _progress(self) -> None:
        """A log line every 10 s while rows are read (a large calibration set takes minutes)."""
        now = time.monotonic()
        if now - self._last >= 10:
            self._last = now
            log.info("calibration: %d rows of %s read in %.0f s", self.rows, Path(self.path).name, now - self._t0)

    def _batches(self) -> Iterator[dict]:
        p = Path(self.path)
        if p.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(p)
            cols = self.features.columns()
            missing = [c for c in cols if c not in pf.schema_arrow.names]
            if missing:
                raise DataError(f"The calibration set {p} lacks column(s) {missing} ({self.features.kind} data); it "
                                f"has {pf.schema_arrow.names[:30]}.",
                                "select the calibration set from data with the model's features.")
            for batch in pf.iter_batches(batch_size=self.batch_size, columns=cols):
                df = batch.to_pandas()
                self.rows += len(df)
                self._progress()
                yield feature_matrix(df, self.inputs, self.features, f"calibration set {p.name}")
        else:
            df = read_table(p, "calibration set")
            for start in range(0, len(df), self.batch_size):
                chunk = df.iloc[start : start + self.batch_size]
                self.rows += len(chunk)
                self._progress()
                yield feature_matrix(chunk, self.inputs, self.features, f"calibration set {p.name}")

    def get_next(self) -> dict | None:
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None
        self.rows = 0
        self._t0 = self._last = time.monotonic()

    def __iter__(self) -> Iterator[dict]:
        return self._batches()

    def __deepcopy__(self, memo):  # a generator cannot be copied: the copy starts from the beginning
        c = copy.copy(self)
        c._it, c.rows = None, 0
        return c


class StreamingReader:
    """Feeds ONNX Runtime's calibrator one batch per ``collect_data`` call (with ``CalibStridedMinMax=1`` its loop
    calls :meth:`set_range` per batch), so it never holds more than one batch's intermediate tensors: min-max
    ranges and histograms (percentile, entropy, distribution) are merged batch by batch. Batches are read in order
    from the table reader (ONNX Runtime asks for the ranges in order)."""

    def __init__(self, reader: TableCalibrationReader):
        self.reader, self._left = reader, 0
        self._batches = -(-reader.total_rows // reader.batch_size)

    def __len__(self) -> int:
        return self._batches

    def set_range(self, start_index: int, end_index: int) -> None:
        self._left = end_index - start_index

    def get_next(self) -> dict | None:
        if self._left <= 0:
            return None
        self._left -= 1
        return self.reader.get_next()


def _count_rows(calibration) -> int:
    p = Path(str(calibration))
    if p.suffix.lower() in (".parquet", ".pq") and p.is_file():
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(p).metadata.num_rows
        except Exception:  # noqa: BLE001 - unreadable: read_table names the problem
            pass
    return len(read_table(calibration, "calibration set"))
