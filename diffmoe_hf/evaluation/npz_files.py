"""Reading `.npz` batches that may be damaged (truncated, not a zip, a text file renamed), with one message that names
the file instead of numpy's or zipfile's exception."""

import zipfile
import zlib

import numpy as np


# what reading a damaged .npz raises: not a zip or a truncated one, a bad CRC or compressed stream, an early end, a file
# numpy takes for a pickle (refused: allow_pickle stays False), an unreadable file
DAMAGED_NPZ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError)


class DamagedNpzError(ValueError):
    """An `.npz` file that cannot be read; the message names the file and what failed."""


def read_npz(path: str, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """
    The arrays `names` of `path` that it holds (all of them when `names` is None), read into memory.

    Raises:
        DamagedNpzError: `path` is not a readable `.npz` archive of arrays.
    """
    try:
        data = np.load(path)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array (.npy), not an archive of named arrays")
        with data:
            return {name: data[name] for name in (data.files if names is None else names) if name in data.files}
    except DAMAGED_NPZ_ERRORS as err:
        raise DamagedNpzError(f"{path} is not a readable .npz file ({type(err).__name__}: {err}).") from None
