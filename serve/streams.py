"""Open video streams: online quality-weighted aggregation per stream, frames idempotent by (stream, seq),
and a journal that lets a restarted State replica carry on every open stream where it was.

A frame is counted once: its (stream, seq) and the sha256 of its bytes are kept with the stream. seq counts
from 0 and must be the next one; the same seq again with the same bytes (a client's or the ingress's retry)
gets the answer it got the first time and is not counted again; any other seq is refused with a 409 that
names the stream and the seq it expects.

The journal (<state_dir>/streams.jsonl) gets one line per change, appended before the answer leaves: open,
frame (with the frame's quality, whether it was used, its embedding if so, the decision it led to, and the
s_th and after_decision in force, so a replay under changed settings rebuilds exactly what was answered),
close. A line is a
single write() on an O_APPEND file, so a killed process leaves whole lines (a torn last line is dropped on
replay: its frame was never answered, so the retry counts it). A new StreamBook replays the journal and
rewrites it as one snapshot line per open stream (closed streams are dropped).
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.aggregation import OnlineAggregator
from serve.errors import ServiceError
from serve.gallery import check_name

JOURNAL_FILE = "streams.jsonl"
UNDECIDED = "undecided"
IDENTIFIED = "identified"
UNKNOWN = "unknown"  # enough quality seen, but no gallery identity is close enough


@dataclass
class Stream:
    name: str
    s_th: float
    decide_at: float
    opened_at: float = field(default_factory=time.time)
    model: str | None = None  # fingerprint of the model of its first frame
    agg: OnlineAggregator = None  # type: ignore[assignment]
    last_seq: int = -1
    last_digest: str = ""
    last_quality: float = float("nan")
    last_used: bool = False
    last_ts: float | None = None
    frames_seen: int = 0
    frames_used: int = 0
    decisions: int = 0
    decision: dict[str, Any] = field(default_factory=lambda: {"status": UNDECIDED})

    def __post_init__(self) -> None:
        if self.agg is None:
            self.agg = OnlineAggregator(s_th=self.s_th, decide_at=self.decide_at)

    def status(self) -> dict[str, Any]:
        return {"stream": self.name, "frames_seen": self.frames_seen, "frames_used": self.frames_used,
                "accumulated_quality": self.agg.accumulated_quality, "last_seq": self.last_seq,
                "decisions": self.decisions, "decision": dict(self.decision)}

    def answer(self, duplicate: bool = False) -> dict[str, Any]:
        return {**self.status(), "seq": self.last_seq, "quality": self.last_quality, "used": self.last_used,
                "duplicate": duplicate}

    def snapshot(self) -> dict[str, Any]:
        agg = self.agg
        return {"op": "snapshot", "stream": self.name, "opened_at": self.opened_at, "model": self.model,
                "last_seq": self.last_seq, "last_digest": self.last_digest, "last_quality": self.last_quality,
                "last_used": self.last_used, "last_ts": self.last_ts, "frames_seen": self.frames_seen,
                "frames_used": self.frames_used, "decisions": self.decisions, "decision": self.decision,
                "agg": {"sum": None if agg._sum is None else agg._sum.astype(float).tolist(),
                        "frames_seen": agg.frames_seen, "frames_used": agg.frames_used,
                        "accumulated_quality": agg.accumulated_quality}}

    @classmethod
    def from_snapshot(cls, rec: dict[str, Any], s_th: float, decide_at: float) -> Stream:
        stream = cls(rec["stream"], s_th, decide_at, opened_at=rec["opened_at"], model=rec["model"],
                     last_seq=rec["last_seq"], last_digest=rec["last_digest"], last_quality=rec["last_quality"],
                     last_used=rec["last_used"], last_ts=rec["last_ts"], frames_seen=rec["frames_seen"],
                     frames_used=rec["frames_used"], decisions=rec["decisions"], decision=rec["decision"])
        a = rec["agg"]
        stream.agg._sum = None if a["sum"] is None else np.asarray(a["sum"], dtype=np.float64)
        stream.agg.frames_seen, stream.agg.frames_used = a["frames_seen"], a["frames_used"]
        stream.agg.accumulated_quality = a["accumulated_quality"]
        return stream


# identify(template) -> (identity or None, score); raises ServiceError when there is nothing to match against.
Identify = Callable[[np.ndarray], tuple[str | None, float]]


class StreamBook:
    def __init__(self, state_dir: str, s_th: float, decide_at: float, after_decision: str = "continue") -> None:
        self.s_th, self.decide_at, self.after_decision = s_th, decide_at, after_decision
        self.directory = Path(state_dir).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / JOURNAL_FILE
        self.streams: dict[str, Stream] = {}
        self.frames_counted = 0  # since this replica started
        self.duplicates = 0
        self._lock = threading.Lock()
        self.replayed = self._replay()
        self._compact()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    # -- the journal -----------------------------------------------------------------------------
    def _replay(self) -> int:
        if not self.path.exists():
            return 0
        lines = self.path.read_bytes().split(b"\n")
        records = 0
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                if number == len(lines):  # a torn last line: that frame was never answered
                    break
                raise ValueError(f"{self.path} line {number}: not a journal record") from None
            self._apply_record(rec)
            records += 1
        return records

    def _apply_record(self, rec: dict[str, Any]) -> None:
        op, name = rec["op"], rec["stream"]
        if op == "snapshot":
            self.streams[name] = Stream.from_snapshot(rec, self.s_th, self.decide_at)
        elif op == "open":
            self.streams[name] = Stream(name, self.s_th, self.decide_at, opened_at=rec["opened_at"])
        elif op == "close":
            self.streams.pop(name, None)
        elif op == "frame":
            stream = self.streams[name]
            emb = None if rec["embedding"] is None else np.asarray(rec["embedding"], dtype=np.float32)
            self._count(stream, rec, emb, recorded=rec["decision"])

    def _compact(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            for stream in self.streams.values():
                f.write(json.dumps(stream.snapshot()) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _append(self, rec: dict[str, Any]) -> None:
        line = (json.dumps(rec) + "\n").encode()
        if os.write(self._fd, line) != len(line):
            raise OSError(f"{self.path}: short write")

    # -- streams -----------------------------------------------------------------------------------
    def _get(self, name: str) -> Stream:
        stream = self.streams.get(name)
        if stream is None:
            raise ServiceError(f"stream {name!r}: unknown (never opened, or closed)", 404)
        return stream

    def open(self, name: str) -> dict[str, Any]:
        """Open a stream; opening one that is open already answers its status (a retried open)."""
        check_name("stream", name)
        with self._lock:
            if name not in self.streams:
                rec = {"op": "open", "stream": name, "opened_at": time.time()}
                self._append(rec)
                self._apply_record(rec)
            return self.streams[name].status()

    def close(self, name: str) -> dict[str, Any]:
        with self._lock:
            status = self._get(name).status()
            self._append({"op": "close", "stream": name})
            del self.streams[name]
            return status

    def status(self, name: str) -> dict[str, Any]:
        with self._lock:
            return self._get(name).status()

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [s.status() for _, s in sorted(self.streams.items())]

    def check_frame(self, name: str, seq: int, digest: str) -> dict[str, Any] | None:
        """The recorded answer when (name, seq) is a repeat of the last counted frame; None when seq is the next
        one; a 404/409 ServiceError otherwise. Lets the ingress answer or refuse a frame before running the model."""
        with self._lock:
            repeat = self._check(self._get(name), seq, digest)
            self.duplicates += repeat is not None
            return repeat

    def _check(self, stream: Stream, seq: int, digest: str) -> dict[str, Any] | None:
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ServiceError(f"stream {stream.name!r}: seq must be a whole number >= 0, got {seq!r}")
        if seq == stream.last_seq:
            if digest != stream.last_digest:
                raise ServiceError(f"stream {stream.name!r}: seq {seq} was already counted with another frame; "
                                   f"the next frame is seq {seq + 1}", 409)
            return stream.answer(duplicate=True)
        if seq < stream.last_seq:
            raise ServiceError(f"stream {stream.name!r}: seq {seq} is out of order: seq {stream.last_seq} was the "
                               f"last frame counted, the next is seq {stream.last_seq + 1}", 409)
        if seq > stream.last_seq + 1:
            raise ServiceError(f"stream {stream.name!r}: seq {seq} skips ahead: the next frame is seq "
                               f"{stream.last_seq + 1} (send every frame, in order, counting from 0)", 409)
        return None

    def push(self, name: str, seq: int, ts: float | None, digest: str, embedding: np.ndarray, quality: float,
             model: str, identify: Identify) -> dict[str, Any]:
        """Count one frame (quality + embedding from the model) and answer with the stream's running decision."""
        with self._lock:
            stream = self._get(name)
            repeat = self._check(stream, seq, digest)
            if repeat is not None:
                self.duplicates += 1
                return repeat
            if stream.model is not None and stream.model != model:
                raise ServiceError(f"stream {name!r}: seq {seq} comes from another model (fingerprint {model}) than "
                                   f"the stream's earlier frames ({stream.model}); open a new stream", 409)
            used = quality >= self.s_th and not (self.after_decision == "stop" and stream.decisions)
            decision = None
            if used:
                probe = copy.deepcopy(stream.agg)
                if probe.add(embedding, quality):
                    # This frame completes a template: decide on it before anything is written.
                    identity, score = identify(probe.template)
                    decision = {"status": IDENTIFIED if identity is not None else UNKNOWN, "identity": identity,
                                "score": score, "seq": seq, "ts": ts, "frames": probe.frames_seen}
            rec = {"op": "frame", "stream": name, "seq": seq, "ts": ts, "digest": digest, "quality": float(quality),
                   "used": used, "model": model, "s_th": self.s_th, "after_decision": self.after_decision,
                   "embedding": np.asarray(embedding, dtype=float).tolist() if used else None, "decision": decision}
            self._append(rec)
            self._count(stream, rec, np.asarray(embedding, dtype=np.float32) if used else None, recorded=decision)
            self.frames_counted += 1
            return stream.answer()

    def _count(self, stream: Stream, rec: dict[str, Any], embedding: np.ndarray | None,
               recorded: dict[str, Any] | None) -> None:
        """Apply a counted frame to the stream: the same code live and on replay."""
        stream.last_seq, stream.last_digest, stream.last_ts = rec["seq"], rec["digest"], rec["ts"]
        stream.last_quality, stream.last_used = rec["quality"], rec["used"]
        stream.model = rec["model"]
        stream.frames_seen += 1
        if rec["used"]:  # as recorded, not re-judged under today's s_th
            stream.agg.add(embedding, rec["quality"])
            stream.frames_used += 1
        else:
            stream.agg.frames_seen += 1
        if recorded is not None:
            stream.decision = recorded
            stream.decisions += 1
            # The rule in force when the frame was answered (journals written before it was recorded: today's).
            if rec.get("after_decision", self.after_decision) == "continue":
                stream.agg.reset()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"open_streams": len(self.streams), "frames_counted": self.frames_counted,
                    "duplicates": self.duplicates, "replayed_records": self.replayed}
