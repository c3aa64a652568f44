"""`peftkit serve`: an HTTP API generating images with many adapters over one base pipeline.

Requests that name different adapters share one pipeline call: the batcher collects requests for a
few milliseconds, groups those with the same sampler settings, and runs them as one batch in which
row i is routed to its own adapter (common_kernels per-sample routing; LoRA adapters of one shape
run as a single gathered matmul pair). Adapters are files in a folder, loaded on first use and
evicted least-recently-used beyond a memory budget. Binds 127.0.0.1 unless told otherwise.

    peftkit serve --base ./my-sd-folder --adapters ./adapters --port 7861
    curl -s 127.0.0.1:7861/generate -d '{"prompt": "a photo of sks dog", "adapter": "dog"}' \\
         -H 'content-type: application/json'
"""

# No "from __future__ import annotations": FastAPI reads the endpoint annotations at runtime.
import base64
import io
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from peftkit.common_kernels import AdapterHandle, PeftkitError, load_adapter, routing


@dataclass(frozen=True)
class Request:
    prompt: str
    adapter: str | None = None
    scale: float = 1.0
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5
    width: int = 512
    height: int = 512
    negative_prompt: str = ""

    def batch_key(self) -> tuple:
        return (self.steps, self.guidance, self.width, self.height)


class UnknownAdapter(PeftkitError):
    pass


class AdapterCache:
    """Adapter files `<folder>/<name>.safetensors`, injected into the UNet on demand; least
    recently used ones are unloaded once their parameters exceed `max_bytes`."""

    def __init__(self, unet: torch.nn.Module, folder: str | Path, max_bytes: int) -> None:
        self.unet, self.folder, self.max_bytes = unet, Path(folder), max_bytes
        self.loaded: OrderedDict[str, AdapterHandle] = OrderedDict()

    def available(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.safetensors"))

    @staticmethod
    def _bytes(handle: AdapterHandle) -> int:
        return sum(p.numel() * p.element_size() for p in handle.trainable_parameters())

    def acquire(self, names: list[str]) -> None:
        """Make sure every adapter in `names` is loaded, evicting others if over budget."""
        for name in names:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            path = self.folder / f"{name}.safetensors"
            if not path.is_file():
                raise UnknownAdapter(
                    f"unknown adapter {name!r}: available adapters are {self.available()}"
                )
            handle = load_adapter(self.unet, path, name=name)
            handle.disable()  # rows reach it only through routing
            self.loaded[name] = handle
        keep = set(names)
        while sum(self._bytes(h) for h in self.loaded.values()) > self.max_bytes:
            victim = next((n for n in self.loaded if n not in keep), None)
            if victim is None:
                break
            self.loaded.pop(victim).unload()


class Batcher:
    """One worker thread runs the pipeline; `submit` returns a Future of a PIL image."""

    def __init__(
        self, pipe, cache: AdapterCache, max_batch: int = 8, window_s: float = 0.02
    ) -> None:
        self.pipe, self.cache, self.max_batch, self.window_s = pipe, cache, max_batch, window_s
        self.queue: queue.Queue[tuple[Request, Future]] = queue.Queue()
        self.batches_run = 0
        self._thread = threading.Thread(target=self._loop, daemon=True, name="peftkit-batcher")
        self._thread.start()

    def submit(self, request: Request) -> Future:
        future: Future = Future()
        self.queue.put((request, future))
        return future

    def _collect(self) -> list[tuple[Request, Future]]:
        items = [self.queue.get()]
        deadline = time.monotonic() + self.window_s
        while len(items) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                items.append(self.queue.get(timeout=left))
            except queue.Empty:
                break
        return items

    def _loop(self) -> None:
        while True:
            items = self._collect()
            groups: dict[tuple, list[tuple[Request, Future]]] = {}
            for request, future in items:
                groups.setdefault(request.batch_key(), []).append((request, future))
            for group in groups.values():
                for part in _split_scales(group):
                    self._run(part)

    def _run(self, group: list[tuple[Request, Future]]) -> None:
        requests = [r for r, _ in group]
        try:
            names = sorted({r.adapter for r in requests if r.adapter})
            self.cache.acquire(names)
            for r in requests:
                if r.adapter:
                    self.cache.loaded[r.adapter].set_scale(r.scale)
            ids = [names.index(r.adapter) if r.adapter else -1 for r in requests]
            first = requests[0]
            cfg = first.guidance > 1.0
            with routing(self.pipe.unet, ids * 2 if cfg else ids, names), torch.no_grad():
                images = self.pipe(
                    prompt=[r.prompt for r in requests],
                    negative_prompt=[r.negative_prompt for r in requests] if cfg else None,
                    generator=[
                        torch.Generator(self.pipe.device).manual_seed(r.seed) for r in requests
                    ],
                    num_inference_steps=first.steps,
                    guidance_scale=first.guidance,
                    width=first.width,
                    height=first.height,
                ).images
            self.batches_run += 1
            for (_, future), image in zip(group, images):
                future.set_result(image)
        except Exception as err:  # every waiting request hears about the failure
            for _, future in group:
                future.set_exception(err)


def _split_scales(group: list[tuple[Request, Future]]) -> list[list[tuple[Request, Future]]]:
    """An adapter has one scale per forward: rows asking the same adapter at other scales wait
    for a later pass."""
    parts: list[list[tuple[Request, Future]]] = []
    for item in group:
        request = item[0]
        for part in parts:
            if all(r.adapter != request.adapter or r.scale == request.scale for r, _ in part):
                part.append(item)
                break
        else:
            parts.append([item])
    return parts


def create_app(batcher: Batcher, timeout_s: float = 600.0):
    """The FastAPI app: GET /health, GET /adapters, POST /generate."""
    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel, Field

    class GenerateBody(BaseModel):
        prompt: str = Field(min_length=1, max_length=2000)
        adapter: str | None = Field(default=None, max_length=200)
        scale: float = Field(default=1.0, ge=0.0, le=4.0)
        seed: int = Field(default=0, ge=0, le=2**63 - 1)
        steps: int = Field(default=25, ge=1, le=200)
        guidance: float = Field(default=7.5, ge=0.0, le=50.0)
        width: int = Field(default=512, ge=8, le=2048, multiple_of=8)
        height: int = Field(default=512, ge=8, le=2048, multiple_of=8)
        negative_prompt: str = Field(default="", max_length=2000)

    app = FastAPI(title="peftkit serve")

    @app.get("/health")
    def health() -> dict:
        return {"ok": True, "batches_run": batcher.batches_run}

    @app.get("/adapters")
    def adapters() -> dict:
        return {"available": batcher.cache.available(), "loaded": list(batcher.cache.loaded)}

    @app.post("/generate")
    def generate(body: GenerateBody) -> dict:
        if body.adapter and body.adapter not in batcher.cache.available():
            raise HTTPException(
                404,
                f"unknown adapter {body.adapter!r}: available adapters are "
                f"{batcher.cache.available()}",
            )
        future = batcher.submit(Request(**body.model_dump()))
        try:
            image = future.result(timeout=timeout_s)
        except PeftkitError as err:
            raise HTTPException(422, str(err)) from None
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {
            "image_png_base64": base64.b64encode(buffer.getvalue()).decode(),
            "adapter": body.adapter,
            "seed": body.seed,
        }

    return app


def serve(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="peftkit serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="diffusers pipeline folder or hub id")
    parser.add_argument(
        "--adapters", required=True, help="folder of peftkit adapter files (<name>.safetensors)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument(
        "--window-ms", type=float, default=20.0, help="how long to gather requests into one batch"
    )
    parser.add_argument(
        "--cache-mb", type=float, default=1024.0, help="memory budget for loaded adapters"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not Path(args.adapters).is_dir():
        raise PeftkitError(
            f"adapter folder {args.adapters!r} does not exist: create it and put "
            "<name>.safetensors adapter files in it"
        )
    import uvicorn

    from peftkit.diffusion.base import load_base

    pipe = load_base(
        args.base, dtype=torch.float16 if args.device.startswith("cuda") else torch.float32
    ).pipe
    pipe.to(args.device)
    cache = AdapterCache(pipe.unet, args.adapters, int(args.cache_mb * 2**20))
    app = create_app(Batcher(pipe, cache, args.max_batch, args.window_ms / 1000))
    print(f"peftkit serve: http://{args.host}:{args.port}  adapters: {cache.available()}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
