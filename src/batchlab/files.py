"""Reading the user's text files (TOML configs, CSV data): UTF-8 only, with one-line errors.

Python's own errors for a file saved in another encoding (``UnicodeDecodeError: 'utf-8' codec
can't decode byte 0xff in position 0``) say neither which file nor what to do; these do.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from .errors import BatchlabError

# Byte-order marks of encodings a text editor may choose when asked for "Unicode".
_OTHER_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"),
)


def read_text(path: str | Path, what: str, error: type[BatchlabError]) -> str:
    """The text of a UTF-8 file (a leading UTF-8 byte-order mark is dropped).

    Args:
        path: the file.
        what: the kind of file, for the error (``config file``, ``data file``).
        error: the `BatchlabError` kind to raise (``ConfigError`` for configs, ``DataError`` for data).

    Returns:
        The file's text.

    Raises:
        error: one line naming the file, when it cannot be read or is not UTF-8 text.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    for bom, encoding in _OTHER_BOMS:  # UTF-32 LE starts with the UTF-16 LE mark: longest first
        if raw.startswith(bom):
            raise error(f"cannot read {what} {path}: it is {encoding} text, not UTF-8; save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise error(f"cannot read {what} {path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); "
                    "save it as UTF-8") from None
