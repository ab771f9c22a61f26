"""The output processor alone (no model): token stops, incremental text, stop strings and their holdback, and
that it alone writes finish reasons (the scheduler is told to release, nothing more)."""

from longreach.engine.output import OutputProcessor, detokenize_incrementally
from longreach.engine.sampling_params import SamplingParams
from longreach.engine.sequence import RequestStatus, Sequence
from longreach.model.tokenizer import EOS_TOKEN_ID, ByteTokenizer

TOK = ByteTokenizer()


class Releases:
    """Stands in for the scheduler: records what it was asked to release."""

    def __init__(self):
        self.released = []

    def __call__(self, seq):
        seq.status = RequestStatus.FINISHED
        self.released.append(seq.request_id)


def _setup(params, max_model_len=64, tokenizer=TOK):
    release = Releases()
    proc = OutputProcessor(tokenizer, [EOS_TOKEN_ID], max_model_len, release)
    seq = Sequence("r", TOK.encode("Q:", add_bos=False), params)
    proc.add(seq)
    return proc, seq, release


def _feed(proc, seq, text_or_ids):
    ids = TOK.encode(text_or_ids, add_bos=False) if isinstance(text_or_ids, str) else text_or_ids
    outs = []
    for token in ids:
        seq.append_token(token)
        outs.append(proc.process([seq])[0])
        if outs[-1].finished:
            break
    return outs


def test_stop_string_cuts_the_text_and_holds_back_what_could_start_it():
    proc, seq, release = _setup(SamplingParams(max_tokens=50, stop=["END"]))
    outs = _feed(proc, seq, "abcENxENDzzz")
    deltas = [o.delta_text for o in outs]
    assert "".join(deltas) == "abcENx"  # "EN" was held back until "x" ruled it out
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == "END" and outs[-1].text == "abcENx"
    assert release.released == ["r"] and len(outs[-1].token_ids) == 9


def test_include_stop_string_and_a_string_beats_a_token_stop_on_the_same_token():
    proc, seq, _ = _setup(SamplingParams(max_tokens=4, stop=["cd"], include_stop_str_in_output=True))
    outs = _feed(proc, seq, "abcd")  # the 4th token hits max_tokens and completes "cd"
    assert (outs[-1].finish_reason, outs[-1].stop_reason, outs[-1].text) == ("stop", "cd", "abcd")


def test_token_stops_and_their_reasons():
    proc, seq, _ = _setup(SamplingParams(max_tokens=10))
    out = _feed(proc, seq, TOK.encode("hi", add_bos=False) + [EOS_TOKEN_ID])[-1]
    assert (out.finish_reason, out.stop_reason, out.text) == ("stop", None, "hi")  # EOS is not text
    proc, seq, _ = _setup(SamplingParams(max_tokens=10, stop_token_ids=[ord("x")]))
    assert (_feed(proc, seq, "abx")[-1].finish_reason, seq.stop_reason) == ("stop", ord("x"))
    proc, seq, _ = _setup(SamplingParams(max_tokens=3))
    assert _feed(proc, seq, "abcdef")[-1].finish_reason == "length" and seq.num_output_tokens == 3
    proc, seq, _ = _setup(SamplingParams(max_tokens=None), max_model_len=5)
    assert _feed(proc, seq, "abcdef")[-1].finish_reason == "length" and seq.num_tokens == 5
    proc, seq, _ = _setup(SamplingParams(max_tokens=10, min_tokens=3, ignore_eos=False))
    outs = _feed(proc, seq, [EOS_TOKEN_ID, ord("a"), EOS_TOKEN_ID, EOS_TOKEN_ID])
    assert len(outs) == 3 and outs[-1].finish_reason == "stop"  # EOS ends it once min_tokens are out


def test_abort_and_token_only_mode():
    proc, seq, release = _setup(SamplingParams(max_tokens=10), tokenizer=None)
    out = _feed(proc, seq, [5, 6])[-1]
    assert out.text == "" and out.token_ids == [5, 6] and not out.finished
    out = proc.abort(seq)
    assert out.finish_reason == "abort" and release.released == ["r"]
    assert proc.abort(seq).finish_reason == "abort" and release.released == ["r"]  # idempotent


def test_incremental_detokenizer_waits_for_whole_characters():
    ids = list("é".encode())  # two bytes: the first alone is not a character
    text, prefix, read = detokenize_incrementally(TOK, ids[:1], 0, 0)
    assert text == "" and (prefix, read) == (0, 0)
    text, prefix, read = detokenize_incrementally(TOK, ids, prefix, read)
    assert text == "é" and read == 2
