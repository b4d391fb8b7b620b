"""Data files: ``.npz`` (arrays ``X``, ``y``, ``task``; never unpickled) and CSV with a task column.

Writers are atomic: the data go to a temporary file in the target's directory, are flushed and
fsynced, and only then renamed over the target with ``os.replace``, so a reader never sees a
partial file and a crash leaves the old file (or none) in place.
"""
from __future__ import annotations

import contextlib
import csv
import os
import tempfile
import zipfile

import numpy as np

from mtl_jax.validation import validate_dataset

SUPPORTED_EXTENSIONS = (".npz", ".csv")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file next to ``path`` for writing; on success fsync it and rename it to ``path``.

    ``with atomic_write("out.npz") as f: ...`` — if the block raises, the temporary file is
    removed and ``path`` is untouched. The temporary name keeps the extension of ``path`` (so
    ``np.savez`` never appends another ``.npz``) and starts with a dot.
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    suffix = os.path.splitext(name)[1]
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=f".tmp{suffix}")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": "", "encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_npz(path, **arrays) -> None:
    """Write ``arrays`` to the ``.npz`` file ``path`` atomically (uncompressed ``np.savez`` format).

    ``path`` must end in ``.npz``. Object arrays are refused: they would need pickle, and
    :func:`load` reads with ``allow_pickle=False``.
    """
    path = os.fspath(path)
    if not path.lower().endswith(".npz"):
        raise ValueError(f"path: {path!r} must end in .npz")
    if not arrays:
        raise ValueError("arrays: nothing to save")
    converted = {}
    for name, value in arrays.items():
        a = np.asarray(value)
        if a.dtype.hasobject:
            raise ValueError(f"{name}: object arrays cannot be saved (they would need pickle)")
        converted[name] = a
    with atomic_write(path, "wb") as f:
        np.savez(f, **converted)


def save_csv(path, X, y, task, feature_names=None, *, task_column: str = "task", target_column: str = "y") -> None:
    """Write a dataset as CSV atomically: a header, the feature columns, then the target and task columns.

    Floats are written with ``repr`` precision, so :func:`load` reads back exactly the same
    float64 values. ``feature_names`` defaults to ``x0, x1, ...``.
    """
    X, y, task, _ = validate_dataset(X, y, task)
    d = X.shape[1]
    if feature_names is None:
        feature_names = [f"x{j}" for j in range(d)]
    feature_names = [str(c) for c in feature_names]
    if len(feature_names) != d:
        raise ValueError(f"feature_names: {len(feature_names)} names for {d} feature columns")
    header = [*feature_names, target_column, task_column]
    if len(set(header)) != len(header):
        raise ValueError(f"feature_names: column names must be unique and differ from the target/task columns, got {header}")
    with atomic_write(path, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        for xi, yi, ti in zip(X.tolist(), y.tolist(), task.tolist()):
            writer.writerow([*map(repr, xi), repr(yi), ti])


def load(path, *, task_column: str = "task", target_column: str = "y"):
    """Read a dataset file, choosing the format by extension.

    * ``.npz``: arrays ``X`` (N, d), ``y`` (N,), ``task`` (N,), read with ``allow_pickle=False``
      (other arrays in the file are ignored).
    * ``.csv``: a header row; the columns named ``task_column`` and ``target_column``; every
      other column is a numeric feature, in file order.

    Returns:
      ``(X, y, task)`` as checked by :func:`~mtl_jax.data.validate_dataset` (float ``X``/``y``,
      int64 ``task``; labels are not checked against a loss here).

    Raises:
      ValueError: naming the path and what is wrong (unknown extension, not a valid npz, a
        missing array or column, an object array, non-numeric values, wrong shapes, an empty
        file, or any :func:`validate_dataset` failure).
      FileNotFoundError: the file does not exist.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        X, y, task = _read_npz(path)
    elif ext == ".csv":
        X, y, task = _read_csv(path, task_column, target_column)
    else:
        raise ValueError(
            f"{path}: unsupported file extension {ext or '(none)'!r}; expected one of {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    try:
        X, y, task, _ = validate_dataset(X, y, task)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return X, y, task


def read_npz(path, names=None) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` at ``path`` (all of them, or those in ``names``), never unpickling.

    Raises FileNotFoundError for a missing file and ValueError, in our own words, for a file that is
    not a zip archive, a truncated or corrupt one, a missing array, or an array of Python objects
    (which only pickle could load: NumPy's advice to load such a file "unsafely" is not passed on).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a valid .npz file (not a zip archive)")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # BadZipFile, truncated archive, ...
        raise ValueError(f"{path}: not a valid .npz file ({type(e).__name__})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not a valid .npz file")
    with data:
        wanted = list(data.files) if names is None else list(names)
        missing = [k for k in wanted if k not in data.files]
        if missing:
            raise ValueError(f"{path}: missing array(s) {', '.join(missing)} (found: {', '.join(data.files) or 'none'})")
        arrays = {}
        for k in wanted:
            try:
                arrays[k] = data[k]
            except ValueError as e:
                if "allow_pickle" in str(e):
                    raise ValueError(f"{path}: array {k!r} holds Python objects, which are never loaded (they "
                                     "would need pickle); save plain numeric arrays") from None
                raise ValueError(f"{path}: array {k!r} cannot be read (corrupt: {type(e).__name__})") from None
            except Exception as e:  # corrupt members: bad CRC, truncated data
                raise ValueError(f"{path}: array {k!r} cannot be read (corrupt: {type(e).__name__})") from None
    return arrays


def _read_npz(path):
    arrays = read_npz(path, ("X", "y", "task"))
    for k, ndim in (("X", 2), ("y", 1), ("task", 1)):
        if arrays[k].ndim != ndim:
            raise ValueError(f"{path}: array {k!r} must be {ndim}-D, got shape {arrays[k].shape}")
    return arrays["X"], arrays["y"], arrays["task"]


def _read_csv(path, task_column, target_column):
    # utf-8-sig: spreadsheets save "CSV UTF-8" with a byte-order mark, which must not join the first column's name.
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path}: empty file (no header row)") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a valid CSV file ({e})") from None
        header = [h.strip() for h in header]
        if len(set(header)) != len(header):
            dup = sorted({h for h in header if header.count(h) > 1})
            raise ValueError(f"{path}: duplicate column name(s) {dup}")
        for role, col in (("task_column", task_column), ("target_column", target_column)):
            if col not in header:
                raise ValueError(f"{path}: missing {role} {col!r} (columns: {header})")
        ti, yi = header.index(task_column), header.index(target_column)
        fi = [j for j in range(len(header)) if j not in (ti, yi)]
        rows = []
        try:
            for row in reader:
                if not row or all(not c.strip() for c in row):
                    continue  # blank line
                if len(row) != len(header):
                    raise ValueError(
                        f"{path}: line {reader.line_num} has {len(row)} fields, the header has {len(header)}"
                    )
                try:
                    rows.append([float(c) for c in row])
                except ValueError:
                    j = next(j for j, c in enumerate(row) if not _is_float(c))
                    raise ValueError(
                        f"{path}: non-numeric value {row[j]!r} in column {header[j]!r} at line {reader.line_num}"
                    ) from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a valid CSV file ({e})") from None
    if not rows:
        raise ValueError(f"{path}: no data rows")
    data = np.asarray(rows, dtype=np.float64)
    return data[:, fi], data[:, yi], data[:, ti]


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def npz_member_rows(path, name):
    """Array ``name`` of the ``.npz`` at ``path`` for reading some rows: a read-only memory map when the member
    is stored uncompressed (``np.savez``, ``save_npz``), so that ``a[rows]`` reads those rows from disk only.

    A compressed member (``np.savez_compressed``) cannot be mapped; it is read whole (still without pickle).
    Raises FileNotFoundError, or ValueError for a missing member or an array of Python objects.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    member = name + ".npy"
    with zipfile.ZipFile(path) as z:
        try:
            info = z.getinfo(member)
        except KeyError:
            raise ValueError(f"{path}: has no array {name!r}") from None
        stored = info.compress_type == zipfile.ZIP_STORED
    if not stored:
        return read_npz(path, [name])[name]
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"{path}: not a valid .npz file (bad local header of {member})")
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject:
            raise ValueError(f"{path}: array {name!r} holds Python objects, which only pickle could load")
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
