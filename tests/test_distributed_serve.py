"""The inspection service on Ray Serve (``anomalyclip serve --ray``): the same app and answers as
in-process, batched with ``@serve.batch``, on the session's local Ray (1 replica; tests/ray_session.py)."""

from __future__ import annotations

import asyncio
import base64
import io
import socket

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("ray.serve")

import httpx  # noqa: E402

from anomalyclip import AnomalyCLIP  # noqa: E402
from anomalyclip.serve import ServeSettings, create_app  # noqa: E402
from anomalyclip.serve.encoding import decode_map_png  # noqa: E402
from anomalyclip.serve.loading import ModelSpec  # noqa: E402

from .conftest import OFFICIAL_PTH, TINY_CLIP_REF  # noqa: E402
from .ray_session import RAY_GROUP, start_ray  # noqa: E402

S = 112


def _png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model(tiny_clip) -> AnomalyCLIP:
    m = AnomalyCLIP.from_official_checkpoint(OFFICIAL_PTH, clip=tiny_clip, backbone=TINY_CLIP_REF, device="cpu")
    return m.reconfigure(image_size=S)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    rng = np.random.default_rng(1)
    return [_png(Image.fromarray(rng.integers(0, 255, (30 + 4 * i, 50, 3), dtype=np.uint8))) for i in range(8)]


@pytest.fixture(scope="module")
def ray_url(tmp_path_factory, model):
    """Ray Serve on the local Ray: the service deployed as ``anomalyclip serve --ray`` does."""
    start_ray()
    from ray import serve

    from anomalyclip.serve.ray_serve import APP_NAME, build_deployment

    saved = tmp_path_factory.mktemp("ray-serve") / "model"
    model.save_pretrained(saved)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = ServeSettings(max_batch_size=8, batch_wait_ms=50)
        app = build_deployment(ModelSpec(model=str(saved), options={"device": "cpu"}), settings, cpus_per_replica=1)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()  # Ray itself stops after the last test that uses it (tests/ray_session.py)


@RAY_GROUP
def test_ray_serve_answers_like_the_local_app(ray_runtime, ray_url, model, images):
    local = create_app(model)
    query = "?map=1&image_threshold=0.3&pixel_threshold=0.5"

    async def run_local():
        async with local.router.lifespan_context(local):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=local), base_url="http://test") as c:
                answers = [await c.post(f"/v1/predict{query}", files={"file": ("a.png", d, "image/png")}) for d in images]
                return [a.json() for a in answers], (await c.get("/v1/model")).json()

    async def run_ray():
        async with httpx.AsyncClient(base_url=ray_url, timeout=120) as c:
            answers = await asyncio.gather(*[c.post(f"/v1/predict{query}", files={"file": ("a.png", d, "image/png")}) for d in images])
            bad = await c.post("/v1/predict", content=b"junk", headers={"content-type": "image/png"})
            after = await c.post(f"/v1/predict{query}", files={"file": ("a.png", images[0], "image/png")})
            return answers, bad, after, (await c.get("/v1/model")).json(), (await c.get("/metrics")).text, await c.get("/v1/health")

    expected, local_info = asyncio.run(run_local())
    answers, bad, after, info, metrics, health = asyncio.run(run_ray())
    assert health.json() == {"status": "ok"}
    info.pop("service"), local_info.pop("service")  # the batching settings differ on purpose
    assert info == local_info
    assert [a.status_code for a in answers] == [200] * len(images)
    for got, want in zip((a.json() for a in answers), expected):
        assert abs(got["score"] - want["score"]) < 1e-5
        assert (got["label"], got["width"], got["height"]) == (want["label"], want["width"], want["height"])
        assert (got["image_threshold"], got["pixel_threshold"]) == (0.3, 0.5)
        a = decode_map_png(base64.b64decode(got["map_png"]), got["map_scale"])
        b = decode_map_png(base64.b64decode(want["map_png"]), want["map_scale"])
        assert np.abs(a - b).max() <= 2e-5
    assert bad.status_code == 400 and "error" in bad.json() and after.status_code == 200
    count = float(next(x.split()[-1] for x in metrics.splitlines() if x.startswith("anomalyclip_batch_size_count")))
    total = float(next(x.split()[-1] for x in metrics.splitlines() if x.startswith("anomalyclip_batch_size_sum")))
    assert total == len(images) + 1 and count < total  # @serve.batch gathered concurrent requests
