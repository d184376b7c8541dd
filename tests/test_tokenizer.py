import numpy as np
import pytest

from harness.tokenizer import BOS, Tokenizer, train_tokenizer
from hybrid.errors import UserError

TEXTS = [
    "To be, or not to be, that is the question:",
    "Ünïcödé: naïve café, Straße, 日本語のテキスト, Ελληνικά, עברית",
    "emoji 🎉🧪👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, numbers 1234567890 3.14159",
    "tabs\tand\r\nnewlines\n\n\n   spaces   ",
    "<|bos|> is plain text here, not a special token",
    "",
    "\U0010ffff\u0000\ufffd",
]


@pytest.fixture(scope="module")
def tok(prepared_test) -> Tokenizer:
    return Tokenizer.load(prepared_test.tokenizer)


def test_vocab_and_specials(tok):
    assert tok.vocab_size == 2048
    assert tok.bos_id == 2047
    assert tok.enc.decode_single_token_bytes(tok.bos_id) == BOS.encode()
    assert tok.token_bytes()[tok.bos_id] == 0


def test_token_bytes_sum_to_utf8_length(tok):
    lengths = tok.token_bytes()
    for text, ids in zip(TEXTS, tok.encode(TEXTS)):
        assert lengths[ids].sum() == len(text.encode("utf-8")), text
        assert tok.decode(ids) == text


def test_token_bytes_match_raw_bytes(tok):
    lengths = tok.token_bytes()
    assert all(lengths[i] == len(tok.enc.decode_single_token_bytes(i)) for i in range(tok.vocab_size - 1))
    assert (lengths[:-1] > 0).all()


def test_partial_utf8_tokens_counted_by_raw_bytes(tok):
    """A token holding part of a multi-byte character decodes to U+FFFD (3 bytes); its raw length is what counts."""
    ids = tok.encode(["🧪"])[0]
    assert len(ids) > 1  # the emoji is split across byte-level tokens
    assert tok.token_bytes()[ids].sum() == 4


def test_save_load_roundtrip(tok, tmp_path):
    tok.save(tmp_path / "t.pkl")
    again = Tokenizer.load(tmp_path / "t.pkl")
    assert again.encode(TEXTS) == tok.encode(TEXTS)
    assert np.array_equal(again.token_bytes(), tok.token_bytes())


def test_train_small():
    texts = ["the quick brown fox jumps over the lazy dog " * 20, "pack my box with five dozen liquor jugs " * 20]
    tok = train_tokenizer(texts, 270)
    assert tok.vocab_size == 270 and tok.bos_id == 269
    assert tok.token_bytes()[tok.encode(texts)[0]].sum() == len(texts[0])


def test_train_errors():
    with pytest.raises(UserError, match="vocab_size"):
        train_tokenizer(["abc"], 100)
    with pytest.raises(UserError, match="too small"):
        train_tokenizer(["ab"], 2048)
