"""Pretrained word vectors from files: :func:`load_vectors`, :class:`Vectors`, :class:`VectorsReport`.

Streams a word2vec (text or binary; fastText's ``.vec`` is word2vec text) or GloVe file,
gzip-compressed or not, keeps only the words of a vocabulary and says what it found.
Pure NumPy and the standard library: no framework, no model. :meth:`embgrad.tables.Table.assign_vectors`
writes the result into a table. Shapes: F vectors found, D their dimension.
"""
from __future__ import annotations

import codecs
import gzip
import io
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EmbgradError

__all__ = ["load_vectors", "Vectors", "VectorsReport"]


@dataclass(frozen=True)
class VectorsReport:
    """What :func:`load_vectors` found: counts, examples of missing words and duplicates."""

    path: str
    format: str
    dim: int
    vectors_read: int           # vectors in the file (read)
    header_count: int | None    # what the word2vec header announced
    vocab_size: int             # ids in the vocabulary
    found: int                  # vocabulary ids that got a vector
    missing: int                # vocabulary ids without one
    missing_examples: tuple[str, ...]
    duplicates: int             # vectors skipped because their id already had one (first wins)
    duplicate_examples: tuple[str, ...]

    @property
    def coverage(self) -> float:
        """found / vocab_size."""
        return self.found / self.vocab_size if self.vocab_size else 0.0

    def __str__(self) -> str:
        lines = [f"{self.path} ({self.format}, dim {self.dim}): {self.vectors_read} vectors read",
                 f"  found {self.found} of {self.vocab_size} vocabulary ids ({100 * self.coverage:.1f}%)",
                 f"  missing {self.missing}" + (f", e.g. {', '.join(map(repr, self.missing_examples))}"
                                                if self.missing_examples else "")]
        if self.duplicates:
            lines.append(f"  duplicates {self.duplicates} (first kept), e.g. "
                         f"{', '.join(map(repr, self.duplicate_examples))}")
        return "\n".join(lines)


class Vectors:
    """Pretrained vectors for the vocabulary ids found in a file, in file order.

    ``ids`` int64 (F,) vocabulary ids (unique), ``vectors`` float32 (F, D), ``words`` the F
    words as written in the file, ``report`` a :class:`VectorsReport`.
    """

    __slots__ = ("ids", "vectors", "words", "report")

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, words: tuple[str, ...], report: VectorsReport):
        self.ids = ids
        self.vectors = vectors
        self.words = words
        self.report = report

    @property
    def dim(self) -> int:
        return self.report.dim

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        r = self.report
        return (f"Vectors({len(self)} of {r.vocab_size} vocabulary ids, dim={r.dim}, "
                f"missing={r.missing}, duplicates={r.duplicates}, from {Path(r.path).name!r})")


_FORMATS = ("auto", "word2vec_text", "word2vec_binary", "glove")
_CHUNK_BYTES = 1 << 20      # lines (or binary records) parsed at once: memory stays O(this + found)
_MAX_WORD_BYTES = 1 << 16
_MAX_DIM = 1 << 20  # a header announcing more dimensions per vector is damaged (real ones: < 20k)


def _fail(path: Any, where: str, problem: str) -> EmbgradError:
    return EmbgradError(f"{path}, {where}: {problem}")


def _vocab_lookup(vocab: Any) -> tuple[dict[str, int], bool]:
    """``vocab`` as {word: id}, and whether it says to lowercase (a lowercasing tokenizer)."""
    lower = False
    if not isinstance(vocab, (Mapping, list, tuple)) and callable(getattr(vocab, "get_vocab", None)):
        lower = bool(getattr(vocab, "do_lower_case", False))
        vocab = vocab.get_vocab()
    if isinstance(vocab, Mapping):
        out = {}
        for w, i in vocab.items():
            if not isinstance(w, str) or not isinstance(i, (int, np.integer)) or isinstance(i, bool) or i < 0:
                raise EmbgradError(f"vocab must map words (str) to ids (int >= 0), got {w!r}: {i!r}.")
            out[w] = int(i)
        return out, lower
    if isinstance(vocab, (list, tuple)):
        out = {}
        for i, w in enumerate(vocab):
            if not isinstance(w, str):
                raise EmbgradError(f"a vocab list must hold words (str); entry {i} is {w!r}.")
            if w in out:
                raise EmbgradError(f"the vocab list holds {w!r} twice (ids {out[w]} and {i}); each word "
                                   "needs one id. Pass a dict word -> id if that is intended.")
            out[w] = i
        return out, lower
    raise EmbgradError(f"vocab must be a dict word -> id, a list of words (index = id) or a Hugging Face "
                       f"tokenizer (with get_vocab()), got {type(vocab).__name__}.")


def _open(path: Any) -> Any:
    p = Path(path)
    if not p.exists():
        raise EmbgradError(f"{path}: no such file; check the path of the vectors file.")
    if p.is_dir():
        raise EmbgradError(f"{path} is a directory, not a vectors file.")
    try:
        f: io.BufferedIOBase = open(p, "rb")
        magic = f.read(2)
        f.seek(0)
        if magic == b"\x1f\x8b":
            f.close()
            f = gzip.open(p, "rb")
        return f
    except OSError as e:
        raise EmbgradError(f"{path}: cannot read it ({e}).") from None


def _is_binary(sample: bytes, dim: int) -> bool:
    """True when bytes after a word2vec header are raw float32, not text: control bytes, invalid
    UTF-8, or a first record that is not a word followed by ``dim`` numbers (raw floats can be
    printable ASCII, e.g. 161.177 is the bytes 'Z-!C')."""
    if any(b < 32 and b not in (9, 10, 13) for b in sample):
        return True
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
    except UnicodeDecodeError:
        return True
    if b"\n" not in sample:        # a first line longer than the sample: text by the checks above
        return False
    line = sample.split(b"\n", 1)[0].rstrip(b"\r").split()
    if len(line) != dim + 1:
        return True
    try:
        [float(x) for x in line[1:]]
    except ValueError:
        return True
    return False


def _header(first: bytes) -> tuple[int, int] | None:
    """(count, dim) if the first line is a word2vec header 'count dim'."""
    fields = first.split()
    if len(fields) == 2 and all(f.isdigit() for f in fields):
        return int(fields[0]), int(fields[1])
    return None


def _decode(raw: bytes, path: Any, where: str, encoding: str, unicode_errors: str) -> str:
    try:
        return raw.decode(encoding, unicode_errors)
    except UnicodeDecodeError as e:
        bad = raw[max(0, e.start - 8):e.end + 8]
        raise _fail(path, where, f"bytes {bad!r} are not valid {encoding} ({e.reason} at byte "
                    f"{e.start}); pass encoding='latin-1' or unicode_errors='replace' if the file "
                    "is otherwise right.") from None
    except LookupError:
        raise EmbgradError(f"unknown encoding={encoding!r} or unicode_errors={unicode_errors!r}.") from None


def _parse_line(path: Any, lineno: int, word: str, rest: str, dim: int, dim_from: str) -> tuple[str, np.ndarray]:
    """One text line, slowly and precisely: (word, (D,) float32) or an EmbgradError saying why."""
    fields = rest.split()
    if len(fields) > dim:
        extra = fields[:-dim]
        if not all(_is_number(x) for x in extra):   # a word with spaces in it (GloVe 840B has some)
            word, fields = " ".join([word] + extra), fields[-dim:]
    if len(fields) != dim:
        raise _fail(path, f"line {lineno}", f"{len(fields)} numbers after {word!r}, expected {dim} "
                    f"({dim_from}).")
    for k, x in enumerate(fields):
        if not _is_number(x):
            raise _fail(path, f"line {lineno}", f"{x[:40]!r} (number {k + 1} of the vector of "
                        f"{word!r}) is not a number.")
    return word, np.array(fields, dtype=np.float32)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return "_" not in s


def _text_chunks(f: Any, path: Any, dim: int | None, lineno: int, dim_from: str, encoding: str,
                 unicode_errors: str) -> Iterator[tuple[list[str], list[int], np.ndarray]]:
    """Chunks ``(words, line numbers, (n, D) float32)`` of a text vectors file, streamed.

    Fast path: NumPy's C ``loadtxt`` parses a chunk of lines; when it objects, the chunk is
    parsed line by line to name the line and the problem (or accept words with spaces).
    """
    while True:
        raw = f.readlines(_CHUNK_BYTES)
        if not raw:
            return
        words: list[str] = []
        rests: list[str] = []
        locs: list[int] = []
        for b in raw:
            lineno += 1
            try:
                s = b.decode(encoding, unicode_errors)
            except (UnicodeDecodeError, LookupError):    # the message (where, why) is built only now
                s = _decode(b, path, f"line {lineno}", encoding, unicode_errors)
            w, sep, rest = s.partition(" ")
            if not sep:
                w, sep, rest = s.partition("\t")
            if not rest.strip():
                if not s.strip():
                    continue                       # blank line
                raise _fail(path, f"line {lineno}", f"{w.strip()[:40]!r} has no vector (expected a word "
                            f"followed by {dim or 'its'} numbers).")
            if not w:
                raise _fail(path, f"line {lineno}", "the line starts with a space: no word before the numbers.")
            if dim is None:
                dim = len(rest.split())
            words.append(w)
            rests.append(rest)
            locs.append(lineno)
        if not words:
            continue
        assert dim is not None   # set from the first line with a vector
        try:
            vecs = np.loadtxt(rests, dtype=np.float32, comments=None, ndmin=2, quotechar=None)
            ok = vecs.shape == (len(words), dim)
        except ValueError:
            ok = False
        if not ok:   # line by line; nothing sized by dim is allocated before a line has dim numbers
            parsed = [_parse_line(path, ln, w, rest, dim, dim_from)
                      for w, rest, ln in zip(words, rests, locs, strict=True)]
            words = [w for w, _ in parsed]
            vecs = np.stack([v for _, v in parsed])
        yield words, locs, vecs


def _binary_chunks(f: Any, path: Any, count: int, dim: int, encoding: str, unicode_errors: str,
                   offset: int, check_tail: bool) -> Iterator[tuple[list[str], list[int], np.ndarray]]:
    """Chunks ``(words, record numbers, (n, D) float32)`` of a word2vec binary file, streamed:
    each record is a word, a space and D little-endian float32 (then an optional newline).
    ``check_tail``: refuse data after the ``count`` records (the header lied)."""
    nbytes = 4 * dim
    buf = b""
    pos = 0
    rec = 0

    def more() -> bool:
        nonlocal buf, pos, offset
        data = f.read(1 << 20)
        if not data:
            return False
        offset += pos
        buf = buf[pos:] + data
        pos = 0
        return True

    words: list[str] = []
    locs: list[int] = []
    parts: list[bytes] = []
    while rec < count:
        sp = buf.find(b" ", pos)
        while sp < 0:
            if len(buf) - pos > _MAX_WORD_BYTES:
                raise _fail(path, f"record {rec + 1} (byte {offset + _word_start(buf, pos)})",
                            f"no space after a word within {_MAX_WORD_BYTES} bytes: not a word2vec binary "
                            "file, or it is corrupt (try format='word2vec_text' or 'glove').")
            if not more():
                left = buf[pos:]
                what = ("the file ends" if not left.strip() else
                        f"the file ends inside record {rec + 1} ({left[:20]!r}...)")
                raise _fail(path, f"record {rec + 1} (byte {offset + _word_start(buf, pos)})",
                            f"{what} after {rec} vectors, but the header announced {count}: the file "
                            "is truncated or the header lies about the count.")
            sp = buf.find(b" ", pos)
        while len(buf) < sp + 1 + nbytes:
            start = sp - pos
            if not more():
                wb = buf[pos:sp].lstrip(b"\r\n")
                raise _fail(path, f"record {rec + 1} (byte {offset + _word_start(buf, pos)})",
                            f"truncated: the vector of {wb[:40]!r} needs {nbytes} bytes ({dim} float32), "
                            f"only {len(buf) - sp - 1} remain.")
            sp = pos + start
        wb = buf[pos:sp].lstrip(b"\r\n")
        rec += 1
        if not wb:
            raise _fail(path, f"record {rec} (byte {offset + _word_start(buf, pos)})", "empty word before the vector.")
        try:
            words.append(wb.decode(encoding, unicode_errors))
        except (UnicodeDecodeError, LookupError):
            words.append(_decode(wb, path, f"record {rec} (byte {offset + _word_start(buf, pos)})",
                                 encoding, unicode_errors))
        locs.append(rec)
        parts.append(buf[sp + 1:sp + 1 + nbytes])
        pos = sp + 1 + nbytes
        if len(words) * nbytes >= _CHUNK_BYTES:
            yield words, locs, np.frombuffer(b"".join(parts), dtype="<f4").reshape(-1, dim).astype(np.float32)
            words, locs, parts = [], [], []
    if words:
        yield words, locs, np.frombuffer(b"".join(parts), dtype="<f4").reshape(-1, dim).astype(np.float32)
    if not check_tail:
        return
    tail = buf[pos:pos + 4096] + (f.read(4096) if len(buf) - pos < 4096 else b"")
    if tail.strip():
        raise _fail(path, f"after record {count} (byte {offset + _word_start(buf, pos)})",
                    f"the header announced {count} vectors but more data follows ({tail.strip()[:20]!r}...): "
                    "the header lies about the count.")


def _word_start(buf: bytes, pos: int) -> int:
    """Where the word of the record at ``pos`` starts (past the previous record's newline)."""
    seg = buf[pos:pos + 8]
    return pos + len(seg) - len(seg.lstrip(b"\r\n"))


def load_vectors(path: str | Path, vocab: Any, *, format: str = "auto", encoding: str = "utf-8",
                 unicode_errors: str = "strict", lowercase: bool | None = None,
                 transform: Callable[[str], str | None] | None = None,
                 max_vectors: int | None = None) -> Vectors:
    """Pretrained vectors for the words of ``vocab`` from a word2vec or GloVe file, streamed.

    ``vocab``: a dict word -> id, a list of words (index = id) or a Hugging Face tokenizer
    (``get_vocab()``). ``format``: ``"auto"`` (a ``count dim`` header means word2vec, binary
    when raw floats follow; no header means GloVe), ``"word2vec_text"``, ``"word2vec_binary"``
    or ``"glove"``; gzip-compressed files are read as they are. ``lowercase``: lowercase the
    file's words before lookup (None: as the tokenizer does, ``do_lower_case``).
    ``transform``: maps a file word to a vocabulary key (None to skip it), after lowercasing.
    ``max_vectors``: read only the first so many vectors.

    The file is read in chunks; only the vectors of vocabulary words are kept, so memory is
    O(found · D), never the file. The first vector of an id wins; later ones count as
    duplicates. Returns :class:`Vectors`: ids int64 (F,), vectors float32 (F, D), in file order.

    Raises:
        EmbgradError: an unknown ``format``; ``max_vectors`` not a positive int; ``vocab`` empty,
            of another type, mapping a word to a negative or non-int id, or a list holding a word
            twice; the file missing, a directory, unreadable, or damaged (gzip); a malformed file,
            naming the file, the line (or binary record and byte) and the problem: a header
            announcing no vectors or an impossible dimension, a header where ``format`` says
            GloVe (or none where it says word2vec), a line with too few or too many numbers or
            a non-number, NaN/Inf values, more or fewer vectors than the header announced, bytes
            not valid in ``encoding`` (or an unknown ``encoding``/``unicode_errors``), a file
            that is empty, starts with a blank line or holds no vectors. Whatever ``transform``
            raises propagates unchanged.
    """
    if format not in _FORMATS:
        raise EmbgradError(f"format={format!r}: choose one of {', '.join(map(repr, _FORMATS))}.")
    if max_vectors is not None and (not isinstance(max_vectors, int) or max_vectors <= 0):
        raise EmbgradError(f"max_vectors must be a positive int or None, got {max_vectors!r}.")
    lookup, tok_lower = _vocab_lookup(vocab)
    if not lookup:
        raise EmbgradError("vocab is empty: there are no words to look up.")
    lower = tok_lower if lowercase is None else bool(lowercase)
    with _open(path) as f:
        try:
            return _load(f, path, lookup, lower, transform, format, encoding, unicode_errors, max_vectors)
        except (OSError, EOFError, zlib.error) as e:   # gzip damage, I/O errors
            raise EmbgradError(f"{path}: cannot read it to the end ({type(e).__name__}: {e}); the file "
                               "is damaged or truncated.") from None


def _load(f: Any, path: Any, lookup: dict[str, int], lower: bool, transform: Any, format: str,
          encoding: str, unicode_errors: str, max_vectors: int | None) -> Vectors:
    first = f.readline(_MAX_WORD_BYTES)
    bom = len(codecs.BOM_UTF8) if first.startswith(codecs.BOM_UTF8) else 0   # saved by some editors
    first = first[bom:]
    if not first.strip():
        rest = f.read(1 << 16)
        raise _fail(path, "line 1", "the file is empty." if not first + rest else
                    "the first line is blank; a vectors file starts with a header or a vector.")
    header = _header(first)
    count: int | None
    dim: int | None
    if header is not None:       # refuse a damaged header before reading anything it sizes
        count, dim = header
        if not 0 < dim <= _MAX_DIM:
            raise _fail(path, "line 1", f"the header announces dimension {dim}; vectors need at least 1 "
                        f"and at most {_MAX_DIM:,} (the header is damaged, or this is not a vectors file).")
        if count <= 0:
            raise _fail(path, "line 1", f"the header announces {count} vectors; the file holds none.")
    if format == "auto":
        fmt = "glove"
        if header is not None:
            at = f.tell()
            sample = f.read(40 * header[1] + 256)     # a text line of dim numbers fits
            f.seek(at)
            fmt = "word2vec_binary" if _is_binary(sample, header[1]) else "word2vec_text"
    else:
        fmt = format
    shown = first.decode("utf-8", "replace").strip()[:60]
    if fmt.startswith("word2vec") and header is None:
        raise _fail(path, "line 1", f"{shown!r} is not a word2vec header 'count dim' (two integers); "
                    "a GloVe file has no header: pass format='glove' (or 'auto').")
    if fmt == "glove" and header is not None:
        raise _fail(path, "line 1", f"{shown!r} looks like a word2vec header, not a GloVe "
                    "vector; pass format='word2vec_text' or 'word2vec_binary' (or 'auto').")
    count, dim = header if header is not None else (None, None)
    limit = max_vectors if max_vectors is not None else None
    if fmt == "word2vec_binary":
        assert count is not None and dim is not None   # word2vec formats have a header (checked above)
        n = count if limit is None else min(count, limit)
        chunks = _binary_chunks(f, path, n, dim, encoding, unicode_errors, offset=bom + len(first),
                                check_tail=limit is None)
        where = "record"
    else:
        if fmt == "glove":
            f.seek(bom)
        chunks = _text_chunks(f, path, dim, 1 if fmt == "word2vec_text" else 0,
                              "the header's dimension" if dim else "the dimension of line 1",
                              encoding, unicode_errors)
        where = "line"

    cap = len(set(lookup.values()))
    buf = np.empty((min(cap, 1 << 14), 0), np.float32)
    ids: list[int] = []
    found_words: list[str] = []
    seen: set[int] = set()
    dups: list[str] = []
    n_dups = 0
    read = last = extra_at = 0
    for words, locs, vecs in chunks:
        if limit is not None and read + len(words) > limit:
            words, locs, vecs = words[:limit - read], locs[:limit - read], vecs[:limit - read]
        if buf.shape[1] != vecs.shape[1]:
            dim = vecs.shape[1]
            buf = np.empty((buf.shape[0], dim), np.float32)
        finite = np.isfinite(vecs).all(1)
        if not finite.all():
            k = int(np.argmin(finite))
            raise _fail(path, f"{where} {locs[k]}", f"the vector of {words[k]!r} holds NaN/Inf (or a value "
                        "beyond float32's range).")
        take: list[int] = []
        for k, w in enumerate(words):
            key = w.lower() if lower else w
            if transform is not None:
                key = transform(key)
            i = lookup.get(key) if key is not None else None
            if i is None:
                continue
            if i in seen:
                n_dups += 1
                if len(dups) < 5:
                    dups.append(w)
                continue
            seen.add(i)
            take.append(k)
            ids.append(i)
            found_words.append(w)
        if take:
            start = len(ids) - len(take)
            if len(ids) > buf.shape[0]:
                buf.resize((min(cap, max(2 * buf.shape[0], len(ids))), buf.shape[1]), refcheck=False)
            buf[start:len(ids)] = vecs[take]
        if count is not None and read <= count < read + len(words):
            extra_at = locs[count - read]              # the first vector beyond the header's count
        read += len(words)
        last = locs[-1]
        if limit is not None and read >= limit:
            break
    if fmt == "word2vec_text" and limit is None and count is not None and read != count:
        at = extra_at if read > count else last + 1
        raise _fail(path, f"line {at}", f"the header announced {count} vectors but the file holds "
                    f"{read}: the header lies about the count, or the file is truncated.")
    if read == 0:
        raise _fail(path, f"{where} 1", "the file holds no vectors.")
    dim = buf.shape[1]
    buf.resize((len(ids), dim), refcheck=False)
    id_arr = np.array(ids, dtype=np.int64)
    all_ids = np.array(sorted(set(lookup.values())), dtype=np.int64)
    missing_ids = all_ids[~np.isin(all_ids, id_arr)]
    by_id: dict[int, str] = {}
    for w, i in lookup.items():
        by_id.setdefault(i, w)
    report = VectorsReport(
        path=str(path), format=fmt, dim=dim, vectors_read=read, header_count=count,
        vocab_size=len(all_ids), found=len(ids), missing=len(missing_ids),
        missing_examples=tuple(by_id[int(i)] for i in missing_ids[:10]),
        duplicates=n_dups, duplicate_examples=tuple(dups))
    return Vectors(id_arr, buf, tuple(found_words), report)
