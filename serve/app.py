"""The recognition service's deployments, and its application builder (`import_path: serve.app:build`).

    Api (HTTP ingress, FastAPI)  ──►  FaceModel (N replicas, @serve.batch across streams and requests)
             │                         embedding (flip-sum, L2-normalised) + quality of face crops
             └──────────────────►  State (one replica): the gallery (persisted) + the open streams (journaled)

The model replicas hold no state: one that dies is replaced and the ingress resends its frames elsewhere.
The State replica writes every change (gallery file, streams journal) before it answers, and a new one
reads them back, so a killed State replica loses nothing; while it restarts the ingress retries (frames are
idempotent by (stream, seq)), and after `retry_s` answers 503 naming the stream. README "Recognition service".
"""

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle

from serve.config import ServiceConfig
from serve.errors import ServiceError
from serve.frames import decode_frame
from serve.gallery import Gallery, check_name
from serve.streams import StreamBook

HEALTH_CHECK_PERIOD_S = 2.0  # how soon Serve notices a dead replica and starts another


def fingerprint(net) -> str:
    """sha256 (first 16 hex digits) of the network's weights: which model a template or frame came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64,
                  health_check_period_s=HEALTH_CHECK_PERIOD_S)
class FaceModel:
    """Embedding + quality of face crops, batched across every caller."""

    def __init__(self, settings: dict[str, Any]) -> None:
        # torch and MLflow are imported by the model replicas only: the other replicas, and the controller's
        # build of the application, start seconds sooner without them.
        import torch

        from data.pipeline import normalise
        from flows.checkpoints import load_net_from
        from models.serving import embed_and_score

        self._torch, self._normalise, self._embed_and_score = torch, normalise, embed_and_score
        cfg = ServiceConfig.from_args(settings)
        torch.set_num_threads(cfg.torch_threads)
        model = cfg.model if "://" in cfg.model or cfg.model.startswith(("models:/", "runs:/")) else \
            os.path.expanduser(cfg.model)
        self.net = load_net_from(model).eval()
        self.image_size = int(self.net.arch["input_size"])
        self.fingerprint = fingerprint(self.net)
        self.embed.set_max_batch_size(cfg.max_batch_size)
        self.embed.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.batches: list[int] = []

    def info(self) -> dict[str, Any]:
        """The model, and the mean size of this replica's last 1000 batches (how much @serve.batch gathers)."""
        return {"image_size": self.image_size, "embedding_size": int(self.net.arch["embedding_size"]),
                "fingerprint": self.fingerprint, "model": self.net.arch,
                "batch_mean": float(np.mean(self.batches)) if self.batches else 0.0}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def embed(self, pixels: list[np.ndarray]) -> list[tuple[np.ndarray, float, str]]:
        """uint8 (S, S, 3) crops -> (embedding (E,), quality, model fingerprint) each."""
        self.batches.append(len(pixels))
        del self.batches[:-1000]
        images = self._torch.from_numpy(np.ascontiguousarray(self._normalise(np.stack(pixels))))
        embedding, quality = self._embed_and_score(self.net, images)
        return [(embedding[i].numpy(), float(quality[i]), self.fingerprint) for i in range(len(pixels))]


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1000,
                  health_check_period_s=HEALTH_CHECK_PERIOD_S)
class State:
    """The gallery and the open streams. One replica: every stream's frames are counted in one place."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.cfg = ServiceConfig.from_args(settings)
        gallery = self.cfg.gallery if "://" in self.cfg.gallery else os.path.expanduser(self.cfg.gallery)
        self.gallery = Gallery.load(gallery)
        self.streams = StreamBook(self.cfg.state_dir, self.cfg.s_th, self.cfg.decide_at, self.cfg.after_decision)
        self.started_at = time.time()

    def enrol(self, name: str, embeddings: np.ndarray, qualities: np.ndarray, model: str) -> dict[str, Any]:
        return self.gallery.enrol(name, embeddings, qualities, model)

    def remove(self, name: str) -> dict[str, Any]:
        return self.gallery.remove(name)

    def list_gallery(self) -> list[dict[str, Any]]:
        return self.gallery.list()

    def _need_gallery(self, what: str) -> None:
        if not self.gallery.identities:
            raise ServiceError(f"{what}: the gallery is empty: enrol identities first (PUT /gallery/<identity>)",
                               409)

    def open(self, name: str) -> dict[str, Any]:
        self._need_gallery(f"stream {name!r}")
        return self.streams.open(name)

    def check_frame(self, name: str, seq: int, digest: str) -> dict[str, Any] | None:
        """The recorded answer of a resent frame, None for the next one, a 404/409 otherwise: before any gallery or
        model check, so a resend gets its first answer whatever changed since."""
        return self.streams.check_frame(name, seq, digest)

    def push(self, name: str, seq: int, ts: float | None, digest: str, embedding: np.ndarray, quality: float,
             model: str) -> dict[str, Any]:
        what = f"stream {name!r}: seq {seq}"
        repeat = self.streams.check_frame(name, seq, digest)
        if repeat is not None:  # a resend that raced its first copy past the ingress's check
            return repeat
        self._need_gallery(what)
        self.gallery.check_model(model, what)
        return self.streams.push(name, seq, ts, digest, embedding, quality, model,
                                 lambda template: self.gallery.identify(template, self.cfg.threshold))

    def close(self, name: str) -> dict[str, Any]:
        return self.streams.close(name)

    def status(self, name: str) -> dict[str, Any]:
        return self.streams.status(name)

    def list_streams(self) -> list[dict[str, Any]]:
        return self.streams.list()

    def stats(self) -> dict[str, Any]:
        return {**self.streams.stats(), "identities": len(self.gallery.identities), "pid": os.getpid(),
                "started_at": self.started_at}


# ------------------------------------------------------------------------------------------ the HTTP API

api = FastAPI(title="EQFace recognition service", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ServiceError)
async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


def _cause(exc: BaseException) -> BaseException:
    """The ServiceError a replica raised, out of Ray's wrapping of it."""
    if isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", None), ServiceError):
        return exc.cause
    return exc


async def _read_body(request: Request, limit: int, what: str) -> bytes:
    """The request's body, refused with a 413 past `limit` bytes (without reading the rest)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServiceError(f"{what}: body too large ({declared} bytes > {limit})", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServiceError(f"{what}: body too large (over {limit} bytes)", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())  # in constant time: no token guessed byte by byte


def _seq_and_ts(stream: str, request: Request) -> tuple[int, float | None]:
    raw_seq, raw_ts = request.query_params.get("seq"), request.query_params.get("ts")
    try:
        seq = int(raw_seq)
        if seq < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise ServiceError(f"stream {stream!r}: query parameter seq must be a whole number >= 0 (the frame's "
                           f"number in the stream, from 0), got {raw_seq!r}") from None
    if raw_ts is None:
        return seq, None
    try:
        ts = float(raw_ts)
        if not np.isfinite(ts):
            raise ValueError
    except ValueError:
        raise ServiceError(f"stream {stream!r}: seq {seq}: query parameter ts must be a finite number (the "
                           f"camera's timestamp, seconds), got {raw_ts!r}") from None
    return seq, ts


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=512,
                  health_check_period_s=HEALTH_CHECK_PERIOD_S)
@serve.ingress(api)
class Api:
    def __init__(self, model: DeploymentHandle, state: DeploymentHandle, settings: dict[str, Any]) -> None:
        self.cfg = ServiceConfig.from_args(settings)
        self.model, self.state = model, state
        self.frames_to_model = 0  # stream frames this replica sent to the model (a resend is not one)
        self.token = Path(self.cfg.api_token_file).expanduser().read_text().strip() if self.cfg.api_token_file \
            else None
        self._image_size: int | None = None

    # -- plumbing ----------------------------------------------------------------------------------
    def _authorise(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        if not (header.startswith("Bearer ") and _same(header[len("Bearer "):].strip(), self.token)):
            raise ServiceError("missing or wrong bearer token (Authorization: Bearer <token>)", 401)

    async def _call(self, method, *args, what: str):
        """A call to a model or State replica, retried while the replica is dead or restarting."""
        deadline = time.monotonic() + self.cfg.retry_s
        delay = 0.05
        while True:
            try:
                return await method.remote(*args)
            except RayActorError as exc:
                if time.monotonic() + delay > deadline:
                    raise ServiceError(f"{what}: not answered: the replica was unavailable for {self.cfg.retry_s:.0f}"
                                       f" s ({type(exc).__name__}); send it again (frames are idempotent by "
                                       "stream and seq)", 503) from None
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)
            except RayTaskError as exc:
                cause = _cause(exc)
                if cause is exc:
                    raise ServiceError(f"{what}: failed: {type(exc.cause).__name__}: {exc.cause}", 500) from None
                raise cause from None

    async def _size(self) -> int:
        if self._image_size is None:
            info = await self._call(self.model.info, what="model")
            self._image_size = int(info["image_size"])
        return self._image_size

    async def _embed(self, pixels: np.ndarray, what: str) -> tuple[np.ndarray, float, str]:
        return await self._call(self.model.embed, pixels, what=what)

    async def _decode(self, data: bytes, what: str) -> np.ndarray:
        try:
            return decode_frame(data, await self._size(), self.cfg.max_frame_bytes, self.cfg.max_pixels)
        except ServiceError as exc:
            raise ServiceError(f"{what}: {exc.message}", exc.status) from None

    async def _images(self, request: Request, what: str) -> list[np.ndarray]:
        """The decoded images of a JSON body {"images": [base64, ...]}."""
        limit = self.cfg.max_images_per_request * (self.cfg.max_frame_bytes * 4 // 3 + 8) + 1024
        body = await _read_body(request, limit, what)
        try:
            images = json.loads(body)["images"]
            if not isinstance(images, list) or not images:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise ServiceError(f'{what}: expected a JSON body {{"images": [base64-encoded image, ...]}} with at '
                               "least one image") from None
        if len(images) > self.cfg.max_images_per_request:
            raise ServiceError(f"{what}: {len(images)} images > max_images_per_request "
                               f"{self.cfg.max_images_per_request}", 413)
        out = []
        for i, item in enumerate(images):
            try:
                data = base64.b64decode(item, validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise ServiceError(f"{what}: image {i}: not base64") from None
            out.append(await self._decode(data, f"{what}: image {i}"))
        return out

    # -- routes --------------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self, request: Request) -> dict[str, Any]:
        self._authorise(request)
        model = await self._call(self.model.info, what="model")
        state = await self._call(self.state.stats, what="state")
        return {"model": model, "state": state, "api": {"frames_to_model": self.frames_to_model}}

    @api.get("/gallery")
    async def list_gallery(self, request: Request) -> dict[str, Any]:
        self._authorise(request)
        return {"identities": await self._call(self.state.list_gallery, what="gallery")}

    @api.put("/gallery/{identity}")
    async def enrol(self, identity: str, request: Request) -> dict[str, Any]:
        self._authorise(request)
        what = f"identity {identity!r}"
        check_name("identity", identity)
        pixels = await self._images(request, what)
        scored = await asyncio.gather(*(self._embed(p, what) for p in pixels))
        models = {m for _, _, m in scored}
        if len(models) > 1:  # a model update mid-request: never mix two networks in one template
            raise ServiceError(f"{what}: images scored by different models ({', '.join(sorted(models))}); retry",
                               503)
        embeddings = np.stack([e for e, _, _ in scored])
        qualities = np.array([q for _, q, _ in scored], dtype=np.float32)
        summary = await self._call(self.state.enrol, identity, embeddings, qualities, models.pop(), what=what)
        return {**summary, "qualities": qualities.tolist()}

    @api.delete("/gallery/{identity}")
    async def remove(self, identity: str, request: Request) -> dict[str, Any]:
        self._authorise(request)
        return await self._call(self.state.remove, identity, what=f"identity {identity!r}")

    @api.post("/score")
    async def score(self, request: Request) -> dict[str, Any]:
        self._authorise(request)
        pixels = await self._images(request, "score")
        scored = await asyncio.gather(*(self._embed(p, "score") for p in pixels))
        return {"results": [{"quality": q, "embedding": e.tolist(), "model": m} for e, q, m in scored]}

    @api.post("/streams")
    async def open_stream(self, request: Request) -> dict[str, Any]:
        self._authorise(request)
        body = await _read_body(request, 4096, "open stream")
        try:
            doc = json.loads(body) if body.strip() else {}
            name = doc.get("stream") or uuid.uuid4().hex
        except (ValueError, AttributeError):
            raise ServiceError('open stream: expected an empty body or JSON {"stream": "<name>"}') from None
        return await self._call(self.state.open, check_name("stream", name), what=f"stream {name!r}")

    @api.get("/streams")
    async def list_streams(self, request: Request) -> dict[str, Any]:
        self._authorise(request)
        return {"streams": await self._call(self.state.list_streams, what="streams")}

    @api.get("/streams/{stream}")
    async def stream_status(self, stream: str, request: Request) -> dict[str, Any]:
        self._authorise(request)
        return await self._call(self.state.status, stream, what=f"stream {stream!r}")

    @api.delete("/streams/{stream}")
    async def close_stream(self, stream: str, request: Request) -> dict[str, Any]:
        self._authorise(request)
        return await self._call(self.state.close, stream, what=f"stream {stream!r}")

    @api.post("/streams/{stream}/frames")
    async def push(self, stream: str, request: Request) -> dict[str, Any]:
        """Body: the encoded face crop; query: seq (from 0, one by one) and ts (the camera's timestamp)."""
        self._authorise(request)
        seq, ts = _seq_and_ts(stream, request)
        what = f"stream {stream!r}: seq {seq}"
        data = await _read_body(request, self.cfg.max_frame_bytes, what)
        digest = hashlib.sha256(data).hexdigest()
        # A resend is answered from the journal without decoding or running the model; a frame out of order is
        # refused before that work too.
        repeat = await self._call(self.state.check_frame, stream, seq, digest, what=what)
        if repeat is not None:
            return repeat
        pixels = await self._decode(data, what)
        self.frames_to_model += 1
        embedding, quality, model = await self._embed(pixels, what)
        return await self._call(self.state.push, stream, seq, ts, digest, embedding, quality, model, what=what)


def build(args: dict[str, Any]) -> serve.Application:
    """The application of configs/serve.yaml (`args` = ServiceConfig's keys)."""
    settings = ServiceConfig.from_args(args).to_args()
    return Api.bind(FaceModel.bind(settings), State.bind(settings), settings)
