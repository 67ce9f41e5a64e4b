"""Image inputs: limits, decompression bombs, formats, SSRF, redirects — each a clear 4xx, and the server
keeps serving. Also: one image + text with experts off is exactly the reference's Alpaca prompt and greedy
output."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib

import pytest
import torch
from PIL import Image

from models.preprocess import clip_transform
from models.prompts import format_alpaca
from server.api.errors import APIError
from server.api.images import ImageLimits, ImageLoader, decode_image, is_public
from tests.api.conftest import MSG, LocalHTTP, app_client, data_url, image_message, png_bytes

LIMITS = ImageLimits(max_bytes=2_000_000, max_pixels=4_000_000, max_side=4096,
                     formats=frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"}), fetch_timeout=1.0)


def png_header_only(width: int, height: int) -> bytes:
    """A valid-looking PNG that claims width×height pixels but carries almost no data (a bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b"")


def jpeg_bytes(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def tall_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (1, 100_000), 128).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- unit


def test_decode_refuses_bombs_before_decoding():
    with pytest.raises(APIError) as e:
        decode_image(png_header_only(60_000, 60_000), 0, LIMITS)
    assert e.value.status == 413 and "pixels" in e.value.message
    with pytest.raises(APIError) as e:  # under Pillow's own bomb threshold, over ours
        decode_image(png_header_only(3000, 3000), 0, LIMITS)
    assert e.value.status == 413 and "3000×3000" in e.value.message


def test_decode_refuses_extreme_sides_truncation_and_non_images():
    with pytest.raises(APIError) as e:
        decode_image(tall_png(), 0, LIMITS)
    assert e.value.status == 413 and "1×100000" in e.value.message
    with pytest.raises(APIError) as e:
        decode_image(jpeg_bytes()[:300], 0, LIMITS)
    assert e.value.status == 400 and "truncated" in e.value.message
    with pytest.raises(APIError) as e:
        decode_image(b"GIF89a but not really", 0, LIMITS)
    assert e.value.status == 400
    tiff = io.BytesIO()
    Image.new("RGB", (4, 4)).save(tiff, format="TIFF")
    with pytest.raises(APIError, match="allowed formats"):
        decode_image(tiff.getvalue(), 0, LIMITS)
    assert decode_image(jpeg_bytes(), 0, LIMITS).size == (64, 48)


def test_public_address_check():
    import ipaddress as ip

    for addr in ["127.0.0.1", "10.1.2.3", "192.168.0.1", "172.16.5.5", "169.254.169.254", "::1", "fe80::1",
                 "::ffff:127.0.0.1", "0.0.0.0", "100.64.0.1", "224.0.0.1", "fd00::1", "64:ff9b::7f00:1",
                 "fec0::1", "192.0.0.8", "100.127.255.254", "198.18.0.1"]:
        assert not is_public(ip.ip_address(addr)), addr
    for addr in ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"]:
        assert is_public(ip.ip_address(addr)), addr


def test_loader_fetch_rules():
    async def run():
        body = png_bytes()
        routes = {"/ok.png": (200, {"Content-Type": "image/png"}, body),
                  "/redirect": (302, {"Location": "http://10.0.0.1/secret.png"}, b""),
                  "/big": (200, {"Content-Type": "image/png"}, b"x" * (LIMITS.max_bytes + 1)),
                  "/html": (200, {"Content-Type": "text/html"}, b"<html></html>")}
        with LocalHTTP(routes) as srv:
            strict = ImageLoader(LIMITS)
            allowed = ImageLoader(ImageLimits(**{**LIMITS.__dict__, "allowed_hosts": ("127.0.0.1/32",)}))
            try:
                for url in [srv.url("/ok.png"), "http://localhost:1/x.png", "http://169.254.169.254/latest/",
                            "http://[::1]/x.png", "http://2130706433/x.png"]:
                    with pytest.raises(APIError) as e:
                        await strict.load(url, 0)
                    assert e.value.status == 400 and e.value.code in ("image_url_forbidden", "image_fetch_failed")
                assert srv.hits == {}  # nothing was fetched
                got = await allowed.load(srv.url("/ok.png"), 0)
                assert got.image.size == (32, 24) and len(got.sha256) == 64
                with pytest.raises(APIError, match="redirects"):
                    await allowed.load(srv.url("/redirect"), 0)
                with pytest.raises(APIError) as e:
                    await allowed.load(srv.url("/big"), 0)
                assert e.value.status == 413
                with pytest.raises(APIError, match="not a supported image"):
                    await allowed.load(srv.url("/html"), 0)
                for url in ["ftp://example.com/x.png", "file:///etc/passwd", "http://user:pw@example.com/x.png"]:
                    with pytest.raises(APIError):
                        await allowed.load(url, 0)
            finally:
                await strict.aclose()
                await allowed.aclose()
    asyncio.run(run())


# ---------------------------------------------------------------------------------------------- API


@pytest.fixture(scope="module")
def client(tiny):
    with app_client(tiny, image_max_side=4096, image_max_pixels=4_000_000) as c:
        yield c


def test_hostile_inputs_get_4xx_and_the_server_keeps_serving(client):
    with LocalHTTP({"/redirect": (302, {"Location": "http://10.0.0.1/x.png"}, b"")}) as srv:
        cases = {
            "decompression bomb": data_url(png_header_only(60_000, 60_000)),
            "1x100000 png": data_url(tall_png()),
            "truncated jpeg": data_url(jpeg_bytes()[:300], "image/jpeg"),
            "non-image data url": "data:text/plain;base64,aGVsbG8=",
            "image type, text bytes": data_url(b"hello world", "image/png"),
            "bad base64": "data:image/png;base64,!!!!",
            "loopback": "http://127.0.0.1/x.png",
            "metadata service": "http://169.254.169.254/latest/meta-data/",
            "redirect to private": srv.url("/redirect"),
            "scheme": "file:///etc/passwd",
        }
        for name, url in cases.items():
            r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": image_message(url),
                                                           "max_tokens": 2})
            assert r.status_code in (400, 413), (name, r.status_code, r.text)
            err = r.json()["error"]
            assert err["message"].startswith("image 0:") and err["type"] == "invalid_request_error", name
            ok = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 2})
            assert ok.status_code == 200, name
        assert srv.hits == {}  # the redirect's host was not even contacted: 127.0.0.1 is not allow-listed


def test_redirect_is_not_followed_even_when_the_first_host_is_allowed(tiny):
    with LocalHTTP({"/redirect": (302, {"Location": "http://10.0.0.1/x.png"}, b"")}) as srv, \
            app_client(tiny, image_allowed_hosts=["127.0.0.1"]) as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": image_message(srv.url("/redirect")),
                                                  "max_tokens": 2})
        assert r.status_code == 400 and "redirect" in r.json()["error"]["message"]
        assert srv.hits == {"/redirect": 1}


def test_too_many_images(client):
    url = data_url(png_bytes())
    content = [{"type": "text", "text": "compare"}] + [{"type": "image_url", "image_url": {"url": url}}] * 5
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 400 and "5 images" in r.json()["error"]["message"]


def test_several_images_and_http_fetch(tiny):
    with LocalHTTP({"/a.png": (200, {"Content-Type": "image/png"}, png_bytes(color=(0, 255, 0)))}) as srv, \
            app_client(tiny, image_allowed_hosts=["127.0.0.1"]) as c:
        content = [{"type": "text", "text": "compare"},
                   {"type": "image_url", "image_url": {"url": srv.url("/a.png")}},
                   {"type": "image_url", "image_url": {"url": data_url(jpeg_bytes()), "detail": "low"}}]
        r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 3,
                                                  "messages": [{"role": "user", "content": content}]})
        assert r.status_code == 200, r.text
        assert srv.hits == {"/a.png": 1}


def test_single_image_chat_is_the_reference_prompt_and_greedy_output(tiny, golden, spy_requests):
    """Experts off, one user message with text and one image → format_alpaca(text), BOS, the CLIP tensor."""
    from tests.models.test_reference import greedy

    image = Image.new("RGB", (40, 30), (180, 40, 90))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    with app_client(tiny) as c:
        seen = spy_requests(c)
        r = c.post("/v1/chat/completions", json={
            "model": "tiny", "temperature": 0, "max_tokens": 12, "ignore_eos": True,
            "messages": image_message(data_url(buf.getvalue()), "describe the image")})
    assert r.status_code == 200, r.text
    (request,) = seen
    assert golden["prompt"] == format_alpaca("describe the image")
    assert list(request.prompt_ids) == golden["prompt_tokens"]
    pixels = clip_transform(Image.open(io.BytesIO(buf.getvalue())), tiny.model.image_size, "bgr")
    torch.testing.assert_close(request.images[0].pixels, pixels)
    expected = greedy(tiny.model, [golden["prompt_tokens"]], pixels[None], 12)[0]
    assert r.json()["choices"][0]["message"]["content"] == tiny.tokenizer.decode(expected)


def _resolving_to(monkeypatch, addresses):
    import socket

    async def fake_getaddrinfo(self, host, port, **kw):
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in addresses]

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", fake_getaddrinfo)


def test_a_name_resolving_to_a_public_and_a_private_address_is_refused(monkeypatch):
    from server.api.images import resolve_checked

    _resolving_to(monkeypatch, ["93.184.216.34", "10.0.0.7"])
    with pytest.raises(APIError, match="non-public address 10.0.0.7"):
        asyncio.run(resolve_checked("mixed.example", 80, 0, LIMITS))


def test_every_public_address_is_kept_in_order_to_try(monkeypatch):
    """No connection is made here: only the resolution and its order (fetch_url tries them one by one)."""
    import ipaddress as ip

    from server.api.images import resolve_checked

    _resolving_to(monkeypatch, ["93.184.216.34", "2606:4700:4700::1111", "93.184.216.34"])
    got = asyncio.run(resolve_checked("cdn.example", 443, 0, LIMITS))
    assert got == [ip.ip_address("93.184.216.34"), ip.ip_address("2606:4700:4700::1111")]


def test_pinned_fetches_never_reuse_a_connection():
    """A second hostname on the same IP must get its own connection (and TLS handshake): no keep-alive pool."""
    loader = ImageLoader(LIMITS)
    try:
        pool = loader.client._transport._pool
        assert pool._max_keepalive_connections == 0
    finally:
        asyncio.run(loader.aclose())


def test_each_hostname_on_one_ip_gets_its_own_certificate_check(monkeypatch):
    """A local HTTPS server with a throw-away CA holds a certificate for good.test only. Both names resolve to
    it (one IP and port, as on a CDN): good.test is fetched, and evil.test, asked right after on the same
    address, is refused for its certificate — not served over good.test's connection."""
    import http.server
    import ssl
    import threading

    import trustme

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("good.test").configure_cert(server_ctx)
    png = png_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive on the server side: only the client can refuse to reuse

        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    _resolving_to(monkeypatch, ["127.0.0.1"])
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    limits = ImageLimits(**{**LIMITS.__dict__, "allowed_hosts": ("127.0.0.1",)})

    async def fetch_both():
        loader = ImageLoader(limits, ssl_context=client_ctx)
        try:
            good = await loader.load(f"https://good.test:{port}/a.png", 0)
            with pytest.raises(APIError) as refused:
                await loader.load(f"https://evil.test:{port}/a.png", 1)
            again = await loader.load(f"https://good.test:{port}/b.png", 2)
            return good, refused.value, again
        finally:
            await loader.aclose()

    try:
        good, refused, again = asyncio.run(fetch_both())
    finally:
        httpd.shutdown()
    assert good.image.size == again.image.size == Image.open(io.BytesIO(png)).size
    assert refused.status == 400 and refused.code == "image_fetch_failed"
