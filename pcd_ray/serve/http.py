"""HTTP safety of the API: body-size limit, bearer-token auth, error bodies, base64 and image decoding.

Every client mistake becomes a 4xx with a body that says what was wrong and where, never a 500:
oversize body -> 413, bad base64 -> 400, undecodable or oversize image -> 422, missing or wrong token -> 401,
schema errors -> 422 in FastAPI's ``{"detail": [{"loc", "msg", "type"}]}`` format (without echoing the input,
which may be megabytes of base64).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from pcd_ray.data.images import ImageDecodeError, decode_image
from pcd_ray.serve.schemas import ErrorResponse


class APIError(Exception):
    """A client error rendered as ErrorResponse with this HTTP status."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


def error_response(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=error, detail=detail).model_dump(), status_code=status, headers=headers)


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.error, exc.detail, exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    keep = ("loc", "msg", "type")
    errors = [{k: err[k] for k in keep if k in err} for err in exc.errors()]
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


# ------------------------------------------------------------------------------------------------- body limit
class BodyLimit:
    """ASGI middleware: answers 413 to a request body over ``limit`` bytes before the app parses any of it.

    Content-Length can be absent (chunked upload) or lie, so the bytes that arrive are counted too. The body is
    buffered (at most ``limit`` bytes) and replayed to the app.
    """

    def __init__(self, app: Callable, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(
                scope, receive, send, f"request body is {declared} bytes, over the limit of {self.limit}"
            )
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._refuse(scope, receive, send, f"request body exceeds the limit of {self.limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would report it

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Callable, send: Callable, detail: str) -> None:
        # Connection: close, so the client stops sending the rest of a body nobody reads.
        response = error_response(413, "request_too_large", detail, headers={"connection": "close"})
        await response(scope, receive, send)


# ------------------------------------------------------------------------------------------------------ auth
def check_bearer(request: Request, token: str) -> None:
    """Raises APIError(401) unless the request carries ``Authorization: Bearer <token>``."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    challenge = {"www-authenticate": "Bearer"}
    if scheme.lower() != "bearer" or not given.strip():
        raise APIError(401, "unauthorized", "missing bearer token: send 'Authorization: Bearer <token>'", challenge)
    # Constant-time comparison: response timing must not reveal how much of a guessed token was right.
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise APIError(401, "unauthorized", "invalid bearer token", challenge)


# ---------------------------------------------------------------------------------------------------- images
def decode_base64(text: str, field: str) -> bytes:
    """Base64 (optionally a ``data:...;base64,`` URL, line breaks allowed) -> bytes. APIError(400) naming ``field``."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, "invalid_base64", f"{field}: not valid base64 ({e})") from None


def prepare_image(text: str, field: str, preprocess: Callable, max_pixels: int) -> Any:
    """Base64 image -> model input [3, H, W] float tensor. APIError 400 (base64) or 422 (image) naming ``field``.

    Decoding and resizing happen per image, so a request holds at most one full-size decoded image at a time.
    """
    try:
        return preprocess(decode_image(decode_base64(text, field), max_pixels=max_pixels))
    except ImageDecodeError as e:
        raise APIError(422, "invalid_image", f"{field}: {e}") from None


def openapi_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries documenting this module's error bodies in the OpenAPI schema (422 keeps FastAPI's
    validation-error schema; an undecodable image's 422 carries an ErrorResponse)."""
    described = {400: "invalid base64", 401: "missing or invalid bearer token", 413: "request body too large"}
    return {s: {"model": ErrorResponse, "description": described[s]} for s in statuses}
