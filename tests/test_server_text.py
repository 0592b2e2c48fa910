"""Tokenizers, incremental detokenization (never a broken character) and stop strings."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from neod.config import ModelConfig
from neod.server.textstream import OutputText
from neod.tokenizer import BYTE_BOS, BYTE_EOS, ByteTokenizer, HFTokenizer, load_tokenizer

CORPUS = ["héllo wörld, ça va? 日本語のテキスト 🙂🙃 naïve café", "the quick brown fox jumps",
          "über straße — «quotes» and emoji 🚀✨", "数字 12345 and more text here"] * 20


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE tokenizer.json (GPT-2 style), with a BOS post-processor."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def metaspace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sentencepiece-like tokenizer (Metaspace, like Llama 2): words carry their leading space."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=["<unk>", "<s>"] +
                                  [f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def stream_decode(detok, ids: list[int]) -> list[str]:
    pieces = [detok.step([t]) for t in ids]
    return pieces + [detok.finish()]


def test_byte_tokenizer_round_trip_and_partial_characters() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("é🙂")
    assert ids[0] == BYTE_BOS and bytes(ids[1:]).decode() == "é🙂"
    pieces = stream_decode(tok.detokenizer(ids), ids[1:] + [BYTE_EOS, 300])
    assert pieces[:2] == ["", "é"] and pieces[2:5] == ["", "", ""] and pieces[5] == "🙂"
    assert "".join(pieces) == "é🙂"
    # an invalid byte becomes U+FFFD; a truncated character is flushed as U+FFFD at the end
    assert "".join(stream_decode(tok.detokenizer([]), [0xFF, 65, 0xE6])) == "\ufffdA\ufffd"


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(blacklist_characters="\ufffd", blacklist_categories=("Cs",)),
               max_size=40))
def test_byte_detokenizer_streams_exactly_the_text(text: str) -> None:
    tok = ByteTokenizer()
    pieces = stream_decode(tok.detokenizer([]), list(text.encode()))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("which", ["bpe_file", "metaspace_file"])
def test_hf_detokenizer_matches_full_decode(which: str, request: pytest.FixtureRequest) -> None:
    tok = HFTokenizer(request.getfixturevalue(which))
    raw = tok._tok
    for text in ["ça va? 日本語 🙂🙃 the fox", " über straße — «quotes» 🚀", "naïve café 12345"]:
        prompt = tok.encode("héllo wörld,")
        output = raw.encode(text, add_special_tokens=False).ids
        pieces = stream_decode(tok.detokenizer(prompt), output)
        full = raw.decode(prompt + output, skip_special_tokens=True)
        assert "".join(pieces) == full[len(raw.decode(prompt, skip_special_tokens=True)):]
        assert all("\ufffd" not in p for p in pieces), pieces


def test_hf_tokenizer_adds_bos_and_skips_special_tokens_in_output(bpe_file: Path) -> None:
    tok = HFTokenizer(bpe_file)
    ids = tok.encode("hello")
    assert ids[0] == 0 and tok.vocab_size >= 258
    assert "".join(stream_decode(tok.detokenizer(ids), [1] + ids[1:])) == "hello"


def test_load_tokenizer_choices(bpe_file: Path, tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(ModelConfig()), ByteTokenizer)
    assert isinstance(load_tokenizer(ModelConfig(tokenizer=str(bpe_file))), HFTokenizer)
    assert isinstance(load_tokenizer(ModelConfig(path=str(bpe_file.parent))), HFTokenizer)
    with pytest.raises(ValueError, match="no tokenizer.json in the model folder"):
        load_tokenizer(ModelConfig(path=str(tmp_path)))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        load_tokenizer(ModelConfig(path=str(tmp_path)))


def feed_all(out: OutputText, text: str) -> list[str]:
    pieces = [out.feed([b]) for b in text.encode()]
    return pieces + [out.finish()]


def test_stop_string_cuts_and_holds_back() -> None:
    out = OutputText(ByteTokenizer().detokenizer([]), ("END", "\n\n"))
    pieces = feed_all(out, "abc EN xyz END more")
    assert "".join(pieces) == "abc EN xyz " and out.stopped_by == "END"
    assert "".join(pieces[:6]) == "abc "  # "EN" could still become "END": held back
    # nothing after the match is ever emitted, even if it arrives
    assert out.feed([65]) == "" and out.finish() == ""


def test_first_completed_stop_string_wins_and_text_without_stop_is_complete() -> None:
    out = OutputText(ByteTokenizer().detokenizer([]), ("cd", "bcde"))
    assert "".join(feed_all(out, "abcdef")) == "ab" and out.stopped_by == "cd"
    out = OutputText(ByteTokenizer().detokenizer([]), ("bc", "abcd"))
    assert "".join(feed_all(out, "xabcd")) == "xa" and out.stopped_by == "bc"
    out = OutputText(ByteTokenizer().detokenizer([]), ("zzz",))
    assert "".join(feed_all(out, "héllo zz")) == "héllo zz" and out.stopped_by is None


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abc é", max_size=30), st.lists(st.text(alphabet="abc é", min_size=1,
                                                                  max_size=4), max_size=3))
def test_stop_strings_match_a_reference(text: str, stops: list[str]) -> None:
    out = OutputText(ByteTokenizer().detokenizer([]), tuple(stops))
    emitted = "".join(feed_all(out, text))
    expected, stopped = text, False
    for end in range(1, len(text) + 1):  # generation ends when a stop string first completes
        cuts = [text[:end].find(s) for s in stops if s in text[:end]]
        if cuts:
            expected, stopped = text[:min(cuts)], True
            break
    assert emitted == expected
    assert (out.stopped_by is not None) == stopped
