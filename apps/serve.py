"""`peftkit serve`: an HTTP API generating images with many adapters over one base pipeline.

Requests that name different adapters share one pipeline call: the batcher collects requests for a
few milliseconds, groups those with the same sampler settings, and runs them as one batch in which
row i is routed to its own adapter (common_kernels per-sample routing; LoRA adapters of one shape
run as a single gathered matmul pair). Adapters are files in a folder, loaded on first use and
evicted least-recently-used beyond a memory budget. Binds 127.0.0.1 unless told otherwise; limits,
the bounded queue, cancellation and isolation live in batcher.py; `--api-key` guards an exposed port.

    peftkit serve --base ./my-sd-folder --adapters ./adapters --port 7861
    curl -s 127.0.0.1:7861/generate -d '{"prompt": "a photo of sks dog", "adapter": "dog"}' \\
         -H 'content-type: application/json'
"""

# No "from __future__ import annotations": FastAPI reads the endpoint annotations at runtime.
import asyncio
import base64
import hmac
import io
import logging
import os
from pathlib import Path

import torch
import uvicorn

from peftkit.common_kernels import PeftkitError
from peftkit.common_kernels.args import (
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

from .batcher import (
    AdapterCache,
    Batcher,
    Limits,
    QueueFull,
    Request,
    Stopped,
    TooLarge,
    UnknownAdapter,
)

log = logging.getLogger("peftkit.serve")
# How often a waiting request looks for its client having left.
POLL_S = 0.1


def create_app(
    batcher: Batcher, timeout_s: float = 600.0, api_key: str | None = None, stall_s: float = 60.0
):
    """The FastAPI app: GET /health, GET /adapters, POST /generate."""
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi import Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field

    class GenerateBody(BaseModel):
        # strict: "7" is not a number and 1.5 is not a step count; NaN and inf are refused.
        model_config = ConfigDict(strict=True, extra="forbid")
        prompt: str = Field(min_length=1, max_length=2000)
        adapter: str | None = Field(default=None, max_length=200, pattern=r"^[\w][\w.-]*$")
        scale: float = Field(default=1.0, ge=0.0, le=4.0, allow_inf_nan=False)
        seed: int = Field(default=0, ge=0, le=2**63 - 1)
        steps: int = Field(default=25, ge=1, le=batcher.limits.max_steps)
        guidance: float = Field(default=7.5, ge=0.0, le=50.0, allow_inf_nan=False)
        width: int = Field(default=512, ge=8, le=8192, multiple_of=8)
        height: int = Field(default=512, ge=8, le=8192, multiple_of=8)
        negative_prompt: str = Field(default="", max_length=2000)

    def check_key(request: HttpRequest) -> None:
        if api_key is None:
            return
        bearer = request.headers.get("authorization", "")
        given = request.headers.get("x-api-key") or (
            bearer[7:] if bearer.lower().startswith("bearer ") else ""
        )
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(
                401, "missing or wrong API key: send it as X-API-Key or Authorization: Bearer"
            )

    app = FastAPI(title="peftkit serve")

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, err):
        # The default echoes the input, and a NaN in it cannot be written as JSON (a 500).
        fields = [
            {"loc": list(e["loc"]), "msg": e["msg"]} for e in err.errors() if isinstance(e, dict)
        ]
        return JSONResponse({"detail": fields}, status_code=422)

    @app.exception_handler(Exception)
    async def internal(request, err):
        log.error("request failed", exc_info=err)
        return JSONResponse({"detail": "internal error; see the server's log"}, status_code=500)

    @app.get("/health")
    def health():
        state = batcher.health(stall_s)
        return JSONResponse(state, status_code=200 if state["ok"] else 503)

    @app.get("/adapters", dependencies=[Depends(check_key)])
    def adapters() -> dict:
        return {"available": batcher.cache.available(), "loaded": list(batcher.cache.loaded)}

    @app.post("/generate", dependencies=[Depends(check_key)])
    async def generate(body: GenerateBody, http: HttpRequest) -> dict:
        if body.adapter and body.adapter not in batcher.cache.available():
            raise HTTPException(
                404,
                f"unknown adapter {body.adapter!r}: available adapters are "
                f"{batcher.cache.available()}",
            )
        try:
            ticket = batcher.submit(Request(**body.model_dump()))
        except TooLarge as err:
            raise HTTPException(413, str(err)) from None
        except QueueFull as err:
            raise HTTPException(
                429, str(err), headers={"Retry-After": str(err.retry_after_s)}
            ) from None
        except Stopped as err:
            raise HTTPException(503, str(err)) from None
        waiting = asyncio.wrap_future(ticket)
        # A request whose client left never awaits its outcome: read it here so asyncio does not
        # log "exception was never retrieved" for every abandoned request.
        waiting.add_done_callback(lambda f: f.cancelled() or f.exception())
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise HTTPException(
                        504, f"no image within {timeout_s:g} s: the work is stopped"
                    )
                done, _ = await asyncio.wait({waiting}, timeout=min(POLL_S, left))
                if done:
                    image = waiting.result()
                    break
                if await http.is_disconnected():
                    raise HTTPException(499, "client left")
        except (UnknownAdapter, Stopped) as err:
            raise HTTPException(404 if isinstance(err, UnknownAdapter) else 503, str(err)) from None
        except PeftkitError as err:
            raise HTTPException(422, str(err)) from None
        finally:
            ticket.abandon()  # no-op once answered; otherwise the worker stops at its next step
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
    parser.add_argument("--port", type=non_negative_int, default=7861)
    parser.add_argument("--max-batch", type=positive_int, default=8)
    parser.add_argument(
        "--window-ms", type=non_negative_float, default=20.0, help="how long to gather a batch"
    )
    parser.add_argument(
        "--cache-mb", type=positive_float, default=1024.0, help="memory budget for loaded adapters"
    )
    parser.add_argument(
        "--max-pixels",
        type=positive_int,
        help="largest width x height of one image (default: twice the base's native side, squared)",
    )
    parser.add_argument("--max-steps", type=positive_int, default=100, help="most denoising steps")
    parser.add_argument(
        "--max-work",
        type=positive_int,
        help="most width x height x steps summed over the rows of one pipeline call "
        "(default: max-pixels x max-steps)",
    )
    parser.add_argument(
        "--max-queue", type=positive_int, default=64, help="waiting requests; more get 429"
    )
    parser.add_argument(
        "--timeout-s",
        type=positive_float,
        default=300.0,
        help="a request's longest wait; its work stops after it",
    )
    parser.add_argument(
        "--stall-s",
        type=positive_float,
        default=60.0,
        help="/health answers 503 when a batch makes no step for this long",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("PEFTKIT_API_KEY"),
        help="require this key (X-API-Key or Authorization: Bearer); default $PEFTKIT_API_KEY",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not Path(args.adapters).is_dir():
        raise PeftkitError(
            f"adapter folder {args.adapters!r} does not exist: create it and put "
            "<name>.safetensors adapter files in it"
        )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print("peftkit serve: warning: listening beyond this machine without --api-key")
    from peftkit.diffusion.base import load_base

    pipe = load_base(
        args.base, dtype=torch.float16 if args.device.startswith("cuda") else torch.float32
    ).pipe
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    if args.max_steps >= pipe.scheduler.config.num_train_timesteps:
        raise PeftkitError(
            f"--max-steps {args.max_steps} is not below the scheduler's "
            f"{pipe.scheduler.config.num_train_timesteps} training timesteps: lower it"
        )
    native = Limits.for_pipe(pipe, args.max_steps)
    limits = Limits(args.max_pixels or native.max_pixels, args.max_steps, args.max_work)
    cache = AdapterCache(pipe.unet, args.adapters, int(args.cache_mb * 2**20))
    batcher = Batcher(pipe, cache, args.max_batch, args.window_ms / 1000, limits, args.max_queue)
    app = create_app(batcher, args.timeout_s, args.api_key, args.stall_s)
    print(f"peftkit serve: http://{args.host}:{args.port}  adapters: {cache.available()}")
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=2
    )
    Server(config, batcher).run()
    batcher.close()
    return 0


class Server(uvicorn.Server):
    """Stops the worker as soon as SIGTERM/SIGINT arrives, so waiting requests answer 503 at once
    and the process leaves within a denoising step, not after the batch."""

    def __init__(self, config: uvicorn.Config, batcher: Batcher) -> None:
        super().__init__(config)
        self.batcher = batcher

    def handle_exit(self, sig, frame) -> None:
        self.batcher.close(timeout_s=0)
        super().handle_exit(sig, frame)
