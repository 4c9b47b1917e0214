"""Requests answered from the vocabulary and the chat template alone, without the model:
tokenize, detokenize and apply-template (``Submit.kind``). The engine loop answers them between
steps, in one delta, so they share the request path (admission, auth, metrics) with generation."""

from __future__ import annotations

import array

from engine_proc.backends.base import RequestRejected
from engine_proc.tokenizer import TemplateError, Tokenizer
from ipc.records import Delta, FinishReason, Kind, Submit


def answer(tok: Tokenizer, request: Submit, trusted: bool = False) -> Delta:
    """The one delta that answers ``request`` (not ``Kind.generate``); RequestRejected if it is bad."""
    try:
        if request.kind is Kind.template:
            if request.messages is None:
                raise RequestRejected("invalid_request", "apply-template needs messages", "messages")
            text = tok.chat_text(request.messages, request.gen)
            return Delta(request.rid, text=text, finish_reason=FinishReason.stop)
        if request.kind is Kind.detokenize:
            ids = _ids(tok, request.prompt_ids or b"")
            return Delta(request.rid, text=tok.detokenize(ids), finish_reason=FinishReason.stop)
        if request.messages is not None:
            tokens = tok.chat_tokens(request.messages, request.gen, trusted)
        else:
            tokens = tok.encode(request.prompt or "", special=True)
            if request.add_special:
                tokens = tok.completion_tokens(request.prompt or "")
    except TemplateError as e:
        raise RequestRejected("invalid_request", str(e), "messages") from e
    pieces = tuple(tok.piece(t) or tok.token_text(t).encode() for t in tokens) if request.with_pieces else ()
    return Delta(
        request.rid,
        finish_reason=FinishReason.stop,
        prompt_tokens=len(tokens),
        token_ids=array.array("i", tokens).tobytes(),
        pieces=pieces,
    )


def _ids(tok: Tokenizer, packed: bytes) -> list[int]:
    ids = array.array("i")
    ids.frombytes(packed)
    bad = next((t for t in ids if not 0 <= t < tok.n_vocab), None)
    if bad is not None:
        raise RequestRejected("invalid_request", f"token id {bad} is outside the vocabulary (size {tok.n_vocab})", "tokens")
    return ids.tolist()
