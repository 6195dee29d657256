"""The hostile-input suite: images, events and label lines built to hurt, each with its expected outcome.

Every case runs through the real extraction service (or the real label import) with in-memory
fakes behind the storage and stream interfaces. An expected outcome is "result", a specific
dead-letter code, "accepted" (a label line) or a phrase from a refused label line's reason.
Wire-level cases (pickled and non-JSON bodies on a real broker) are in
tests/integration/test_hostile_wire.py.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from PIL import Image

from shelfsight.shared.image_sources import ImageSourcePolicy
from shelfsight.shared.imaging import decode_image
from shelfsight.shared.registry import ModelRegistry
from shelfsight.shared.settings import Settings
from shelfsight.shared.storage import InMemoryObjectStore
from shelfsight.shared.streams import InMemoryPublisher
from shelfsight.shared.taxonomy import load_taxonomy
from shelfsight.trainer.labels import import_labels
from shelfsight.worker.extractor import ExtractionService
from shelfsight.worker.model_cache import ModelCache

BUCKET = "shelfsight"
UPLOADS = f"s3://{BUCKET}/uploads/"
MAX_PIXELS = 1_000_000
MAX_BYTES = 2_000_000


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(
        bucket=BUCKET, allowed_image_sources=[UPLOADS], model_arch="shelfsight-tiny", model_weights="none",
        device="cpu", batch_size=4, batch_max_wait_ms=2, max_retries=2, retry_backoff_s=0.5,
        max_image_bytes=MAX_BYTES, max_image_pixels=MAX_PIXELS, max_image_frames=100,
    )


@pytest.fixture(scope="module")
def service(settings: Settings) -> Iterator[ExtractionService]:
    store = InMemoryObjectStore()
    taxonomy = load_taxonomy(settings.taxonomy_path)
    svc = ExtractionService(settings, taxonomy, store, InMemoryPublisher(),
                            ModelCache(settings, taxonomy, store, ModelRegistry(store, BUCKET)))
    # service-owned objects that an event must never be able to read as an image
    store.put(BUCKET, "models/pans/test-set.json", b'{"version": "v1"}')
    store.put(BUCKET, "results/pans/victim.json", b'{"secret": "result"}')
    yield svc
    svc.close()


# --- image builders ------------------------------------------------------------------------------

def _save(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _photo(size: tuple[int, int] = (96, 80), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    return rgb.convert(mode)


def _jpeg(**params: Any) -> bytes:
    return _save(_photo(), "JPEG", **params)


def _frames(count: int, size: tuple[int, int], mode: str = "RGB") -> list[Image.Image]:
    return [Image.new(mode, size, (i * 37 % 256, i * 11 % 256, i % 256)) for i in range(count)]


def _animated(fmt: str, count: int, size: tuple[int, int] = (16, 16)) -> bytes:
    frames = _frames(count, size)
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=40)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width×height over a tiny deflate stream (a classic bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _tiff_header(width: int, height: int) -> bytes:
    """A minimal uncompressed greyscale TIFF whose IFD claims width×height."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1),
               (273, 4, 8 + 2 + 12 * 9 + 4), (277, 3, 1), (278, 4, height), (279, 4, min(width * height, 2**32 - 1))]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        ifd += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\x00" * 64


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 header is patched to claim width×height."""
    data = bytearray(_jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    return _save(_photo((96, 80)), "JPEG", exif=exif.tobytes())


def _corrupt_exif() -> bytes:
    return _save(_photo(), "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff\xde\xad")


def _icc(real: bool) -> bytes:
    if real:
        from PIL import ImageCms

        profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    else:
        profile = b"not an icc profile at all" * 10
    return _save(_photo(), "JPEG", icc_profile=profile)


def _sixteen_bit(fmt: str) -> bytes:
    return _save(Image.fromarray(np.full((40, 50), 40000, dtype=np.uint16)), fmt)


def _palette_transparent() -> bytes:
    image = Image.new("P", (40, 30), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (0, 0, 20, 30))
    return _save(image, "PNG", transparency=0)


def _polyglot_zip() -> bytes:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("shell.php", "<?php system($_GET['c']); ?>")
    return _jpeg() + archive.getvalue()


def _gif_with_script_comment() -> bytes:
    return _save(_photo((32, 32)).convert("P"), "GIF", comment=b"*/=alert(1);/*<script>alert(1)</script>")


IMAGE_CASES: list[tuple[str, Callable[[], bytes], str]] = [
    # formats that are never decoded (no Ghostscript, no XML parser, no HEIF plugin)
    ("eps", lambda: _save(_photo((8, 8)), "EPS"), "image_format_not_allowed"),
    ("eps-dos-binary-header", lambda: b"\xc5\xd0\xd3\xc6" + b"\x00" * 28 + b"%!PS-Adobe-3.0 EPSF-3.0\n",
     "image_format_not_allowed"),
    ("postscript", lambda: b"%!PS-Adobe-3.0\n%%BoundingBox: 0 0 10 10\n(x) run showpage\n", "image_format_not_allowed"),
    ("svg-with-script", lambda: b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" '
     b'height="10"><script>alert(1)</script></svg>', "image_format_not_allowed"),
    ("svg-xxe", lambda: b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
     b"<svg>&x;</svg>", "image_format_not_allowed"),
    ("pdf", lambda: b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n", "image_format_not_allowed"),
    ("psd", lambda: b"8BPS\x00\x01" + b"\x00" * 40, "image_format_not_allowed"),
    ("heic", lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64, "image_format_not_allowed"),
    ("avif", lambda: b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + b"\x00" * 64, "image_format_not_allowed"),
    ("ico", lambda: _save(_photo((16, 16)), "ICO"), "image_format_not_allowed"),
    ("jpeg2000", lambda: b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 64, "image_format_not_allowed"),
    ("polyglot-postscript-then-jpeg", lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n" + _jpeg(), "image_format_not_allowed"),
    # bombs: refused from the header, before a pixel is decoded
    ("png-bomb-50000x50000", lambda: _png_bomb_header(50_000, 50_000), "image_too_many_pixels"),
    ("tiff-bomb-100000x100000", lambda: _tiff_header(100_000, 100_000), "image_too_many_pixels"),
    ("jpeg-header-claims-65000x65000", lambda: _jpeg_claiming(65_000, 65_000), "image_too_many_pixels"),
    ("gif-3000-frames", lambda: _animated("GIF", 3000), "image_too_many_frames"),
    ("gif-frames-times-pixels", lambda: _animated("GIF", 40, (200, 200)), "image_too_many_frames"),
    ("apng-150-frames", lambda: _animated("PNG", 150), "image_too_many_frames"),
    ("tiff-150-pages", lambda: _animated("TIFF", 150, (8, 8)), "image_too_many_frames"),
    ("oversized-bytes", lambda: b"\xff\xd8\xff" + b"\x00" * (MAX_BYTES + 1), "image_too_large"),
    # broken or not images at all
    ("zero-bytes", lambda: b"", "undecodable_image"),
    ("html", lambda: b"<!doctype html><html><body><script>alert(1)</script></body></html>", "undecodable_image"),
    ("random-bytes", lambda: bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)),
     "undecodable_image"),
    ("truncated-jpeg", lambda: _jpeg()[:300], "undecodable_image"),
    ("truncated-png", lambda: _save(_photo(), "PNG")[:200], "undecodable_image"),
    ("gif-header-only", lambda: b"GIF89a", "undecodable_image"),
    # odd but legitimate: each gets a result
    ("polyglot-jpeg-with-zip-appended", _polyglot_zip, "result"),
    ("gif-with-script-comment", _gif_with_script_comment, "result"),
    ("png-16-bit-greyscale", lambda: _sixteen_bit("PNG"), "result"),
    ("tiff-16-bit-greyscale", lambda: _sixteen_bit("TIFF"), "result"),
    ("jpeg-cmyk", lambda: _save(_photo(mode="CMYK"), "JPEG"), "result"),
    ("png-palette-with-transparency", _palette_transparent, "result"),
    ("jpeg-exif-rotation", _exif_rotated, "result"),
    ("jpeg-corrupt-exif", _corrupt_exif, "result"),
    ("jpeg-icc-profile", lambda: _icc(real=True), "result"),
    ("jpeg-garbage-icc-profile", lambda: _icc(real=False), "result"),
    ("webp-animated", lambda: _animated("WEBP", 5, (32, 32)), "result"),
    ("gif-animated-few-frames", lambda: _animated("GIF", 5, (32, 32)), "result"),
    ("webp", lambda: _save(_photo(), "WEBP"), "result"),
    ("bmp", lambda: _save(_photo(), "BMP"), "result"),
    ("png-rgba", lambda: _save(_photo(mode="RGBA"), "PNG"), "result"),
    ("tiff", lambda: _save(_photo(), "TIFF"), "result"),
]


def _event(product_id: str, key: str, **extra: Any) -> dict[str, Any]:
    return {"product_id": product_id, "category": "pans", "image": f"s3://{BUCKET}/{key}", **extra}


def _outcome_code(outcome: Any) -> str:
    return "result" if outcome.status == "result" else outcome.detail.get("error_code", outcome.status)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize(("name", "build", "expected"), IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_hostile_image(service: ExtractionService, name: str, build: Callable[[], bytes], expected: str) -> None:
    key = f"uploads/pans/{name}.img"
    service.store.put(BUCKET, key, build(), "application/octet-stream")
    outcome = service.process(_event(f"img-{name}", key))
    assert _outcome_code(outcome) == expected, outcome.detail
    if expected != "result":
        letter = json.loads(service.store.get(BUCKET, outcome.detail["record"]).body)
        assert letter["error_code"] == expected and letter["message"]


def test_exif_rotation_is_applied_before_the_model_sees_the_image(service: ExtractionService) -> None:
    service.store.put(BUCKET, "uploads/pans/rotated.jpg", _exif_rotated(), "image/jpeg")
    assert service.process(_event("rotated", "uploads/pans/rotated.jpg")).status == "result"
    image = json.loads(service.store.get(BUCKET, "results/pans/rotated.json").body)["image"]
    assert (image["width"], image["height"]) == (80, 96)  # stored 96x80, shown upright


def test_sixteen_bit_and_transparent_pixels_decode_to_what_a_person_sees() -> None:
    limits = {"max_bytes": MAX_BYTES, "max_pixels": MAX_PIXELS}
    assert decode_image(_sixteen_bit("PNG"), **limits).getpixel((0, 0)) == (155, 155, 155)  # 40000/257, not white
    palette = decode_image(_palette_transparent(), **limits)
    assert palette.getpixel((30, 5)) == (255, 255, 255)  # transparent index composited on white
    assert palette.getpixel((5, 5)) == (0, 0, 255)


# --- events --------------------------------------------------------------------------------------

NOW = datetime.now(UTC)
GOOD_KEY = "uploads/pans/good.jpg"
GOOD = f"s3://{BUCKET}/{GOOD_KEY}"


def _ev(**fields: Any) -> dict[str, Any]:
    return {"product_id": "sku-1", "category": "pans", "image": GOOD, **fields}


EVENT_CASES: list[tuple[str, Any, str]] = [
    ("giant-product-id", _ev(product_id="x" * 20_000), "event_too_large"),
    ("giant-category", _ev(category="c" * 5_000), "malformed_event"),
    ("deeply-nested-json", "[" * 5_000 + "]" * 5_000, "malformed_event"),
    ("newline-in-product-id", _ev(product_id="sku\n1"), "malformed_event"),
    ("nul-in-product-id", _ev(product_id="sku\x001"), "malformed_event"),
    ("control-chars-in-category", _ev(category="pans\x00\x1b[31m"), "unknown_category"),
    ("homoglyph-product-id", _ev(product_id="\u0455ku-1"), "malformed_event"),
    ("path-traversal-product-id", _ev(product_id="../../models/pans/test-set.json"), "malformed_event"),
    ("path-traversal-category", _ev(category="../models"), "unknown_category"),
    ("path-traversal-event-id", _ev(event_id="../../dead-letters/x"), "malformed_event"),
    ("path-traversal-image-key", _ev(image=f"s3://{BUCKET}/uploads/../models/pans/test-set.json"), "image_source_not_allowed"),
    ("image-is-own-model-pointer", _ev(image=f"s3://{BUCKET}/models/pans/test-set.json"), "image_source_not_allowed"),
    ("image-is-another-result", _ev(image=f"s3://{BUCKET}/results/pans/victim.json"), "image_source_not_allowed"),
    ("image-in-other-bucket", _ev(image="s3://someone-else/uploads/x.jpg"), "image_source_not_allowed"),
    ("image-https-url", _ev(image="https://evil.example/x.jpg"), "malformed_event"),
    ("image-file-url", _ev(image="file:///etc/passwd"), "malformed_event"),
    ("naive-timestamp", _ev(product_id="naive", submitted_at="2026-11-27T10:00:00"), "result"),
    ("far-future-timestamp", _ev(product_id="future", submitted_at="9999-12-31T23:59:59Z"), "submitted_in_future"),
    ("slightly-future-within-skew", _ev(product_id="skew", submitted_at=(NOW + timedelta(seconds=60)).isoformat()),
     "result"),
    ("timestamp-wrong-type", _ev(submitted_at=[2026, 11, 27]), "malformed_event"),
    ("timestamp-not-a-date", _ev(submitted_at="yesterday"), "malformed_event"),
    ("product-id-is-a-number", _ev(product_id=12345), "malformed_event"),
    ("image-is-a-list", _ev(image=[GOOD]), "malformed_event"),
    ("event-is-a-list", [_ev()], "malformed_event"),
    ("event-is-null", None, "malformed_event"),
    ("event-is-a-number", 42, "malformed_event"),
    ("extra-field", _ev(is_admin=True), "malformed_event"),
    ("schema-version-2", _ev(schema_version=2), "malformed_event"),
    ("not-json", "{product_id: sku-1", "malformed_event"),
    ("pickled-bytes", pickle.dumps(_ev()), "malformed_event"),
]


@pytest.mark.parametrize(("name", "event", "expected"), EVENT_CASES, ids=[c[0] for c in EVENT_CASES])
def test_hostile_event(service: ExtractionService, name: str, event: Any, expected: str) -> None:
    service.store.put(BUCKET, GOOD_KEY, _jpeg(), "image/jpeg")
    victim = service.store.get(BUCKET, "results/pans/victim.json").body
    outcome = service.process(event)
    assert _outcome_code(outcome) == expected, outcome.detail
    assert service.store.get(BUCKET, "results/pans/victim.json").body == victim
    if expected not in ("result",):
        message = outcome.detail["message"]
        assert "secret" not in message and '"version"' not in message  # nothing read from a refused object


def test_naive_timestamp_is_stored_as_utc(service: ExtractionService) -> None:
    service.store.put(BUCKET, GOOD_KEY, _jpeg(), "image/jpeg")
    service.process(_ev(product_id="naive-utc", submitted_at="2026-11-27T10:00:00"))
    record = json.loads(service.store.get(BUCKET, "results/pans/naive-utc.json").body)
    assert record["submitted_at"] == "2026-11-27T10:00:00Z"


def test_malformed_payload_cannot_overwrite_another_events_dead_letter(service: ExtractionService) -> None:
    real = service.process(_ev(event_id="victim-event", category="shoes"))
    victim_key = real.detail["record"]
    original = service.store.get(BUCKET, victim_key).body
    forged = service.process({"event_id": "victim-event", "note": "claims the victim's id"})
    assert forged.detail["error_code"] == "malformed_event"
    assert forged.detail["record"] != victim_key and "/malformed/" in forged.detail["record"]
    assert service.store.get(BUCKET, victim_key).body == original


def test_unknown_categories_share_one_metric_label(service: ExtractionService) -> None:
    from prometheus_client import REGISTRY

    def dead(category: str) -> float:
        return REGISTRY.get_sample_value("shelfsight_events_total",
                                         {"outcome": "dead_letter", "category": category}) or 0.0

    before = dead("unknown")
    for i in range(5):
        service.process(_ev(category=f"made-up-{i}"))
    service.process({"category": "not-even-an-event"})
    assert dead("unknown") == before + 6
    assert all(dead(f"made-up-{i}") == 0.0 for i in range(5))


# --- label lines ---------------------------------------------------------------------------------

def _label(**fields: Any) -> dict[str, Any]:
    return {"product_id": "lbl-1", "category": "pans", "image": f"s3://{BUCKET}/uploads/pans/label.jpg",
            "attributes": {"lid": "yes", "handle": "no"}, **fields}


LABEL_CASES: list[tuple[str, str, str]] = [
    ("valid", json.dumps(_label()), "accepted"),
    ("naive-labeled-at", json.dumps(_label(labeled_at="2026-11-27T10:00:00")), "accepted"),
    ("image-outside-allowlist", json.dumps(_label(image="s3://someone-else/uploads/x.jpg")),
     "not under an allowed image source"),
    ("image-is-own-model-pointer", json.dumps(_label(image=f"s3://{BUCKET}/models/pans/test-set.json")),
     "service's own prefixes"),
    ("image-is-another-result", json.dumps(_label(image=f"s3://{BUCKET}/results/pans/victim.json")),
     "service's own prefixes"),
    ("image-path-traversal", json.dumps(_label(image=f"s3://{BUCKET}/uploads/../labels/pans/x.jsonl")), "unsafe key"),
    ("image-missing-inside-allowlist", json.dumps(_label(image=f"s3://{BUCKET}/uploads/pans/none.jpg")),
     "does not exist"),
    ("far-future-labeled-at", json.dumps(_label(labeled_at="9999-12-31T23:59:59Z")), "in the future"),
    ("control-chars-in-product-id", json.dumps(_label(product_id="lbl\n1")), "invalid label"),
    ("giant-product-id", json.dumps(_label(product_id="x" * 10_000)), "invalid label"),
    ("path-traversal-category", json.dumps(_label(category="../models")), "unknown category"),
    ("unknown-attribute-value", json.dumps(_label(attributes={"lid": "maybe", "handle": "no"})), "lid"),
    ("attributes-wrong-type", json.dumps(_label(attributes=["lid", "yes"])), "invalid label"),
    ("extra-field", json.dumps(_label(admin=True)), "invalid label"),
    ("not-an-object", "[1, 2, 3]", "must be a JSON object"),
    ("not-json", "{product_id: lbl-1}", "malformed JSON"),
    ("pickled-line", pickle.dumps(_label()).decode("latin-1").replace("\n", " "), "malformed JSON"),
]


@pytest.fixture(scope="module")
def label_store() -> InMemoryObjectStore:
    store = InMemoryObjectStore()
    store.put(BUCKET, "uploads/pans/label.jpg", _jpeg(), "image/jpeg")
    store.put(BUCKET, "models/pans/test-set.json", b'{"version": "v1"}')
    store.put(BUCKET, "results/pans/victim.json", b"{}")
    return store


@pytest.mark.parametrize(("name", "line", "expected"), LABEL_CASES, ids=[c[0] for c in LABEL_CASES])
def test_hostile_label_line(settings: Settings, label_store: InMemoryObjectStore, name: str, line: str,
                            expected: str) -> None:
    result = import_labels(line, store=label_store, bucket=BUCKET, labels_prefix="labels",
                           taxonomy=load_taxonomy(settings.taxonomy_path), max_bytes=1 << 20,
                           sources=ImageSourcePolicy.from_settings(settings),
                           max_future_skew_s=settings.max_future_skew_s)
    if expected == "accepted":
        assert result.accepted == 1 and not result.rejected, result.as_dict()
        return
    assert result.accepted == 0 and len(result.rejected) == 1
    reason = result.rejected[0].reason
    assert expected in reason, reason
    if "allowed image source" in reason or "own prefixes" in reason:
        assert "exist" not in reason  # nothing said about objects outside the allowlist


def test_the_suite_is_at_least_forty_cases() -> None:
    assert len(IMAGE_CASES) + len(EVENT_CASES) + len(LABEL_CASES) >= 40


def test_the_nvjpeg_path_applies_the_same_header_checks(service: ExtractionService,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA, JPEGs skip PIL decoding and go to nvJPEG; the header checks still run first."""
    from shelfsight.shared.errors import Rejected

    monkeypatch.setattr(service, "_gpu_decode", lambda model: True)
    model = service.models.get("pans")
    prepared = service.prepare(_jpeg(), model)
    assert prepared.pixels is None and prepared.jpeg is not None and (prepared.width, prepared.height) == (96, 80)
    with pytest.raises(Rejected) as caught:
        service.prepare(_jpeg_claiming(65_000, 65_000), model)
    assert caught.value.code == "image_too_many_pixels"
    with pytest.raises(Rejected) as caught:
        service.prepare(b"\xff\xd8\xff" + b"\x00" * 64, model)
    assert caught.value.code == "undecodable_image"


def test_the_nvjpeg_path_leaves_exif_rotated_jpegs_to_pil(service: ExtractionService,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """nvJPEG ignores EXIF orientation, so a JPEG tagged as rotated is decoded with PIL, upright:
    a 96x80 photo tagged "rotate 90" arrives as 80x96 pixels, like on the CPU path."""
    monkeypatch.setattr(service, "_gpu_decode", lambda model: True)
    model = service.models.get("pans")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to view
    rotated = service.prepare(_jpeg(exif=exif.tobytes()), model)
    assert rotated.jpeg is None and rotated.pixels is not None
    assert (rotated.width, rotated.height) == (80, 96)
    exif[0x0112] = 1
    upright = service.prepare(_jpeg(exif=exif.tobytes()), model)
    assert upright.pixels is None and upright.jpeg is not None


def test_both_decode_paths_report_the_full_upright_size_of_a_large_jpeg(service: ExtractionService,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The result file's image width and height are the upload's, not the reduced scale the CPU path
    decodes a large JPEG at (1/4 here), and the same on the CPU and the nvJPEG paths."""
    model = service.models.get("pans")
    buffer = io.BytesIO()
    Image.new("RGB", (1000, 900), (200, 30, 30)).save(buffer, format="JPEG")
    on_cpu = service.prepare(buffer.getvalue(), model)
    assert on_cpu.pixels is not None and (on_cpu.width, on_cpu.height) == (1000, 900)
    monkeypatch.setattr(service, "_gpu_decode", lambda model: True)
    on_gpu = service.prepare(buffer.getvalue(), model)
    assert on_gpu.jpeg is not None and (on_gpu.width, on_gpu.height) == (1000, 900)
