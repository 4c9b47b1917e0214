"""The shared output layer: from the tokens a runtime draws to what the front is sent.

A backend's runtime only draws token ids (masking the logits with the sequence's
:class:`~engine_proc.grammar.Constraint` first, when it has one). For each drawn token it calls
:meth:`ChoiceOutput.accept`, which does everything else, the same way for every backend:

- incremental detokenizing (UTF-8 split across tokens) and stop strings held back across tokens
  (:mod:`engine_proc.backends.detok`);
- the finish decision: end of generation, a stop string, the grammar complete, ``max_tokens``,
  the context full, the tool call complete; and the finish reason (``stop``, ``length``,
  ``tool_calls``);
- the grammar's state (the constraint follows each token);
- tool calls split out of the text (:class:`~engine_proc.tools.ToolCallStream`);
- logprobs aligned with the text sent: a token's entry goes out with the text it completes, and a
  token that the stop-string holdback cuts is cut the same way, so the tokens' texts always join
  to exactly the returned text.

Compare mlx-lm's ``generate_step`` (tokens) under ``stream_generate`` (text), and vLLM's
``EngineCoreOutput`` (token ids) turned into text by its output processor.
"""

from __future__ import annotations

import array
import codecs
import logging
from collections import deque

import numpy as np

from engine_proc.backends.detok import DetokStream
from engine_proc.grammar import Constraint, lark_grammar
from engine_proc.tokenizer import Tokenizer
from engine_proc.tools import ToolCallStream, ToolFormat, forced_grammar
from ipc.records import (
    Delta,
    FinishReason,
    Generation,
    SamplingParams,
    TokenLogprob,
    ToolCall,
    ToolChoice,
    TopLogprob,
)

MAX_TOP_LOGPROBS = 20

log = logging.getLogger("axserving.engine.output")


def constraint_for(gen: Generation, tokenizer: Tokenizer) -> Constraint | None:
    """The grammar a request's output must follow: its own, or a forced tool call's."""
    grammar = gen.grammar
    if gen.tools and gen.tool_choice in (ToolChoice.required, ToolChoice.named):
        grammar = lark_grammar(
            forced_grammar(tokenizer.tool_format, gen.tools, gen.tool_name, gen.parallel_tool_calls)
        )
    if grammar is None:
        return None
    return Constraint(tokenizer.guidance(), grammar, tokenizer.n_vocab)


def tool_stream_for(gen: Generation, fmt: ToolFormat) -> ToolCallStream | None:
    if not gen.tools or gen.tool_choice is ToolChoice.none:
        return None
    forced = gen.tool_choice in (ToolChoice.required, ToolChoice.named)
    return ToolCallStream(fmt, forced=forced, parallel=gen.parallel_tool_calls)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def token_logprob(logits: np.ndarray, token: int, top: int, tokenizer: Tokenizer) -> TokenLogprob:
    """The drawn token's log-probability under ``logits`` (float32, after any grammar mask), and
    the ``top`` most likely tokens'. ``token`` in the entry is filled in by :class:`ChoiceOutput`.
    (About 0.2 ms per token on a 49k vocabulary, most of it the exp and the partition.)"""
    peak = float(logits.max())
    scratch = np.subtract(logits, peak)
    np.exp(scratch, out=scratch)
    lse = peak + float(np.log(scratch.sum(dtype=np.float64)))
    alts: tuple[TopLogprob, ...] = ()
    if top > 0:
        k = min(top, logits.shape[0])
        best = np.argpartition(logits, -k)[-k:]
        best = best[np.argsort(-logits[best], kind="stable")]
        alts = tuple(
            TopLogprob(_text(raw := tokenizer.piece(int(t))), max(float(logits[t]) - lse, -9999.0), raw)
            for t in best
        )
    raw = tokenizer.piece(token)
    return TokenLogprob("", max(float(logits[token]) - lse, -9999.0), raw, alts)


class ChoiceOutput:
    """One choice's output state. ``accept`` each drawn token; it returns that step's delta."""

    __slots__ = (
        "_decoded",
        "_decoder",
        "_detok",
        "_echo",
        "_entries",
        "_has_calls",
        "_markers",
        "_sent",
        "constraint",
        "finish",
        "gen",
        "index",
        "n_cached",
        "n_generated",
        "n_prompt",
        "params",
        "rid",
        "tok",
        "tools",
    )

    def __init__(
        self,
        rid: int,
        index: int,
        params: SamplingParams,
        gen: Generation,
        tokenizer: Tokenizer,
        n_prompt: int,
        echo: str = "",
    ) -> None:
        self.rid, self.index, self.params, self.gen, self.tok = rid, index, params, gen, tokenizer
        self.n_prompt = n_prompt
        self.n_cached = 0
        self.n_generated = 0
        self.finish: FinishReason | None = None
        self.constraint = constraint_for(gen, tokenizer)
        self.tools = tool_stream_for(gen, tokenizer.tool_format)
        self._markers = tokenizer.markers if self.tools is not None else {}
        self._detok = DetokStream(params.stop)
        # Logprob alignment: each token's decoded text and where it starts in the output.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._decoded = 0  # characters decoded so far
        self._sent = 0  # characters released by the stop-string holdback so far
        self._entries: deque[tuple[int, int, str, TokenLogprob]] = deque()  # start, token, text, lp
        self._echo = echo
        self._has_calls = False

    def accept(self, token: int, logprob: TokenLogprob | None = None, at_limit: bool = False) -> Delta:
        """Take one drawn token. ``at_limit``: the context is full after it."""
        self.n_generated += 1
        params, finish = self.params, None
        if self.constraint is not None and not self.constraint.consume(token):
            # Cannot happen with the mask applied; if it does, end this choice, not the engine.
            log.error("request %d: the grammar refused token %d: %s", self.rid, token, self.constraint.error())
            return self.end(FinishReason.stop)
        if not params.ignore_eos and self.tok.is_eog(token):
            text, finish = self._detok.flush(), FinishReason.stop
            self._sent += len(text)
        else:
            raw = self._markers.get(token, "").encode() or self.tok.piece(token)
            if logprob is not None:
                piece = self._decoder.decode(raw)
                self._entries.append((self._decoded, token, piece, logprob))
                self._decoded += len(piece)
            chunk = self._detok.feed(raw)
            text = chunk.text
            self._sent += len(text)
            if chunk.stopped or self.constraint is not None and self.constraint.done():
                finish = FinishReason.stop
            elif self.n_generated >= params.max_tokens or at_limit:
                finish = FinishReason.length
            if finish is not None and not chunk.stopped:
                tail = self._detok.flush()
                self._sent += len(tail)
                text += tail
        return self._delta(text, finish, stopped=finish is not None)

    def end(self, reason: FinishReason) -> Delta:
        """Finish without a token (the runtime decided: a test double's source ran out)."""
        text = self._detok.flush()
        self._sent += len(text)
        return self._delta(text, reason, stopped=True, n_tokens=0)

    def _delta(self, text: str, finish: FinishReason | None, stopped: bool, n_tokens: int = 1) -> Delta:
        lps, ids = self._released(stopped) if self.gen.logprobs >= 0 else ((), b"")
        calls: list[ToolCall] = []
        if self.tools is not None:
            text, calls = self.tools.feed(text)
            if self.tools.done and finish is None:
                finish = FinishReason.stop  # parallel_tool_calls false: one call is the answer
            if finish is not None:
                more_text, more = self.tools.finish()
                text += more_text
                calls += more
            self._has_calls = self._has_calls or bool(calls)
            if finish is FinishReason.stop and self._has_calls:
                finish = FinishReason.tool_calls
        if self._echo:
            text, self._echo = self._echo + text, ""
        self.finish = finish
        return Delta(
            rid=self.rid,
            text=text,
            n_tokens=n_tokens,
            finish_reason=finish,
            prompt_tokens=self.n_prompt,
            completion_tokens=self.n_generated,
            cached_tokens=self.n_cached,
            index=self.index,
            token_ids=ids,
            logprobs=lps,
            tool_calls=tuple(calls),
            stop_sequence=self._detok.matched if finish is not None else "",
        )

    def _released(self, final: bool) -> tuple[tuple[TokenLogprob, ...], bytes]:
        """Entries whose text has all been sent; at the end, those that started before the end
        of the sent text (cut to it: a stop string's first characters are not output)."""
        out: list[TokenLogprob] = []
        ids = array.array("i")
        entries, sent = self._entries, self._sent
        if final and entries:
            tail = self._decoder.decode(b"", final=True)  # incomplete UTF-8 at the end: U+FFFD
            if tail:
                start, token, piece, lp = entries[-1]
                entries[-1] = (start, token, piece + tail, lp)
                self._decoded += len(tail)
        while entries:
            start, token, piece, lp = entries[0]
            end = start + len(piece)
            if end <= sent:
                pass
            elif final and start < sent:
                piece = piece[: sent - start]
            else:
                break
            entries.popleft()
            out.append(TokenLogprob(piece, lp.logprob, lp.raw, lp.top))
            ids.append(token)
        if final:
            entries.clear()  # what is left was a stop string's
        return tuple(out), ids.tobytes()
