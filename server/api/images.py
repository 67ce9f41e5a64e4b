"""Image inputs: `data:` and http(s) URLs → checked, decoded PIL images, with limits at every step.

- data URLs: an image media type, base64, size cap before decoding the base64.
- http(s): the host is resolved and EVERY address must be public (no private, loopback, link-local,
  multicast, reserved or unspecified address, IPv4-mapped forms included) unless the host or address is
  allow-listed; the connection goes to the checked address (no second DNS lookup to rebind), redirects are
  refused, the whole fetch has one timeout and the body a size cap.
- decoding: the format must be on the allow-list and width, height and width × height are checked from the
  header before any pixel is decoded (decompression bombs); truncated files are refused.

Decoding runs in a worker thread; the event loop only awaits. Errors are `APIError`s (400/413) naming the
image by its position in the request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import logging
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx
from PIL import Image, UnidentifiedImageError

from server.api.errors import APIError

log = logging.getLogger("lamina.images")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    max_side: int
    formats: frozenset[str]
    fetch_timeout: float
    allowed_hosts: tuple[str, ...] = ()  # host names, addresses or CIDRs exempt from the SSRF check


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # decoded, RGB
    sha256: str  # of the original bytes
    source: str  # "data" or the URL's host, for logs


def _image_error(index: int, message: str, status: int = 400, code: str = "invalid_image") -> APIError:
    return APIError(status, f"image {index}: {message}", param="messages", code=code)


# ------------------------------------------------------------------------------------------------ data:


def decode_data_url(url: str, index: int, limits: ImageLimits) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise _image_error(index, "malformed data URL (no ',')")
    media = header[5:].split(";")
    if not media[0].lower().startswith("image/"):
        raise _image_error(index, f"data URL media type {media[0] or 'missing'!r} is not an image")
    if "base64" not in (m.lower() for m in media[1:]):
        raise _image_error(index, "data URL images must be base64-encoded (data:image/...;base64,...)")
    if len(payload) * 3 // 4 > limits.max_bytes + 3:
        raise _image_error(index, f"image larger than the {limits.max_bytes}-byte limit", 413, "image_too_large")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _image_error(index, "data URL is not valid base64") from None
    if len(data) > limits.max_bytes:
        raise _image_error(index, f"image larger than the {limits.max_bytes}-byte limit", 413, "image_too_large")
    return data


# ------------------------------------------------------------------------------------------------ http(s)


def _unmapped(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in ipaddress.ip_network("64:ff9b::/96"):  # NAT64 well-known prefix
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


# Not reachable on the public internet, yet `is_global` in some Python versions: site-local IPv6 (deprecated,
# still routed inside networks), IETF protocol assignments (192.0.0.8 and co.), shared address space (CGNAT),
# NAT64 local-use, benchmarking.
_NON_GLOBAL = tuple(ipaddress.ip_network(n) for n in (
    "fec0::/10", "192.0.0.0/24", "100.64.0.0/10", "64:ff9b:1::/48", "198.18.0.0/15"))


def is_public(ip: IPAddress) -> bool:
    ip = _unmapped(ip)
    if any(ip.version == n.version and ip in n for n in _NON_GLOBAL):
        return False
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
                or ip.is_unspecified or not ip.is_global)


def _allowed(host: str, ip: IPAddress, allowed: Sequence[str]) -> bool:
    for entry in allowed:
        if entry == host:
            return True
        try:
            if _unmapped(ip) in ipaddress.ip_network(entry, strict=False) or ip in ipaddress.ip_network(
                    entry, strict=False):
                return True
        except ValueError:
            continue
    return False


async def resolve_checked(host: str, port: int, index: int, limits: ImageLimits) -> list[IPAddress]:
    """Resolve `host`; refuse unless every address is public or allow-listed (a name that resolves to a public
    and a private address is refused). Returns the addresses to try, in the resolver's order."""
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            raise _image_error(index, f"cannot resolve host {host!r}", code="image_fetch_failed") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    if not addresses:
        raise _image_error(index, f"cannot resolve host {host!r}", code="image_fetch_failed")
    for ip in addresses:
        if not is_public(ip) and not _allowed(host, ip, limits.allowed_hosts):
            raise _image_error(
                index,
                f"refusing to fetch {host!r}: it resolves to the non-public address {ip} (private, loopback "
                "and link-local addresses are blocked unless allow-listed with --image-allowed-hosts)",
                code="image_url_forbidden",
            )
    return addresses


async def fetch_url(url: str, index: int, limits: ImageLimits, client: httpx.AsyncClient) -> bytes:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _image_error(index, "image URLs must be http(s)://host/... or data:image/...;base64,...")
    if parts.username or parts.password:
        raise _image_error(index, "image URLs must not contain credentials")
    host = parts.hostname.lower().rstrip(".")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise _image_error(index, "invalid port in image URL") from None
    try:
        async with asyncio.timeout(limits.fetch_timeout):
            addresses = await resolve_checked(host, port, index, limits)
            response = None
            for n, ip in enumerate(addresses):  # each checked address in order, until one connects
                # Connect to the address we checked; Host header and TLS SNI/certificate still use the name.
                ip_host = f"[{ip}]" if ip.version == 6 else str(ip)
                pinned = urlunsplit((parts.scheme, f"{ip_host}:{port}", parts.path or "/", parts.query, ""))
                host_header = parts.netloc.rsplit("@", 1)[-1]
                extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
                request = client.build_request("GET", pinned, headers={"Host": host_header, "Accept": "image/*"},
                                               extensions=extensions)
                try:
                    response = await client.send(request, stream=True, follow_redirects=False)
                    break
                except httpx.ConnectError:
                    if n == len(addresses) - 1:
                        raise
            assert response is not None
            try:
                if response.is_redirect:
                    raise _image_error(index, f"image URL redirects (HTTP {response.status_code}); redirects "
                                              "are not followed — send the final URL", code="image_fetch_failed")
                if response.status_code != 200:
                    raise _image_error(index, f"fetching the image URL gave HTTP {response.status_code}",
                                       code="image_fetch_failed")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                    raise _image_error(index, f"image larger than the {limits.max_bytes}-byte limit", 413,
                                       "image_too_large")
                buf = bytearray()
                async for chunk in response.aiter_bytes():
                    buf += chunk
                    if len(buf) > limits.max_bytes:
                        raise _image_error(index, f"image larger than the {limits.max_bytes}-byte limit", 413,
                                           "image_too_large")
                return bytes(buf)
            finally:
                await response.aclose()
    except TimeoutError:
        raise _image_error(index, f"fetching the image took longer than {limits.fetch_timeout:g} s",
                           code="image_fetch_timeout") from None
    except httpx.HTTPError as e:
        raise _image_error(index, f"fetching the image failed: {type(e).__name__}",
                           code="image_fetch_failed") from None


# ------------------------------------------------------------------------------------------------ decoding


def decode_image(data: bytes, index: int, limits: ImageLimits) -> Image.Image:
    """Bytes → RGB PIL image, refusing disallowed formats and oversized dimensions before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=sorted(limits.formats))
            width, height = image.size
            if width < 1 or height < 1:
                raise _image_error(index, "image has no pixels")
            if max(width, height) > limits.max_side or width * height > limits.max_pixels:
                raise _image_error(
                    index,
                    f"image is {width}×{height} pixels; the limits are {limits.max_side} pixels per side and "
                    f"{limits.max_pixels} pixels in all",
                    413,
                    "image_too_large",
                )
            image.load()
            if getattr(image, "is_animated", False):
                image.seek(0)
            from models.preprocess import to_rgb

            return to_rgb(image)
    except APIError:
        raise
    except UnidentifiedImageError:
        raise _image_error(
            index, f"not a supported image (allowed formats: {', '.join(sorted(limits.formats))})"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _image_error(index, f"image refused as a decompression bomb ({e})", 413, "image_too_large") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
        raise _image_error(index, f"image data is corrupt or truncated ({str(e)[:120]})") from None


# ------------------------------------------------------------------------------------------------ loader


class ImageLoader:
    """Loads a request's images: fetch (on the loop) → decode (in `executor`), timing each stage."""

    def __init__(
        self,
        limits: ImageLimits,
        executor: Executor | None = None,
        observe: Callable[[str, float], None] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        ssl_context: ssl.SSLContext | None = None,  # None: the system's CAs (certifi); tests pass a throw-away CA
    ):
        self.limits = limits
        self.executor = executor
        self.observe = observe or (lambda stage, seconds: None)
        # No keep-alive: fetches are pinned to an IP, and httpcore pools connections by IP and port, so a second
        # hostname on the same address (a CDN) would reuse the first one's TLS session, its certificate unchecked.
        self.client = httpx.AsyncClient(transport=transport, trust_env=False, follow_redirects=False,
                                        verify=ssl_context if ssl_context is not None else True,
                                        limits=httpx.Limits(max_keepalive_connections=0),
                                        timeout=httpx.Timeout(limits.fetch_timeout),
                                        headers={"User-Agent": "lamina-image-fetch"})

    async def aclose(self) -> None:
        await self.client.aclose()

    async def load(self, url: str, index: int) -> LoadedImage:
        t0 = time.perf_counter()
        if url[:5].lower() == "data:":
            data, source = decode_data_url(url, index, self.limits), "data"
        else:
            data = await fetch_url(url, index, self.limits, self.client)
            source = urlsplit(url).hostname or "?"
            self.observe("image_fetch", time.perf_counter() - t0)
        t1 = time.perf_counter()
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(self.executor, decode_image, data, index, self.limits)
        digest = hashlib.sha256(data).hexdigest()
        self.observe("image_decode", time.perf_counter() - t1)
        return LoadedImage(image=image, sha256=digest, source=source)

    async def load_all(self, urls: Sequence[str]) -> list[LoadedImage]:
        """All images concurrently; the first failure cancels the rest and is raised."""
        if not urls:
            return []
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.load(url, i)) for i, url in enumerate(urls)]
        except BaseExceptionGroup as group_error:
            raise _first_leaf(group_error) from None
        return [t.result() for t in tasks]


def _first_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error
