"""Decoding image files with DALI: encoded bytes in, HWC uint8 arrays out, the bad files named.

`fn.decoders.image` runs on the GPU (`device="mixed"`, nvJPEG) when the run has one and on the CPU otherwise,
fed the files' bytes from Python in batches, so a batch that fails can be decoded again one file at a time to
name the file that failed. The channels are decided before decoding, from the files' headers (`header_channels`):
DALI 2.4's CPU decoder corrupted the heap on grayscale JPEGs with `output_type=ANY_DATA`, so it is always asked
for GRAY or RGB. Images not `size` x `size` are resized by the shorter side and centre-cropped in a second
pipeline; the others are kept as decoded, bit for bit.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

import numpy as np

from ..errors import DataError

DECODE_BATCH = 256
READ_HEADERS = (".png", ".jpg", ".jpeg", ".pgm")   # formats whose channel count header_channels reads


class Decoder:
    """DALI pipelines fed encoded bytes from Python: decode (to one channel or to RGB), and resize the shorter
    side plus centre crop for the images that need it."""

    def __init__(self, size: int, device: str, gray: bool = False):
        self.size, self.gpu, self.gray = size, device == "cuda", gray
        self._decode = self._resize = None

    def _device_id(self):
        if not self.gpu:
            return None
        import torch
        return torch.cuda.current_device()

    def _build_decode(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=DECODE_BATCH, num_threads=1, device_id=self._device_id(), exec_dynamic=True,
                      prefetch_queue_depth=1)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, no_copy=False)
            # GRAY or RGB, never ANY_DATA: DALI 2.4's CPU decoder corrupts the heap on grayscale JPEGs with it
            images = fn.decoders.image(encoded, device="mixed" if self.gpu else "cpu",
                                       output_type=types.GRAY if self.gray else types.RGB)
            return images
        p = pipe()
        p.build()
        return p

    def _build_resize(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=DECODE_BATCH, num_threads=1, device_id=None, exec_dynamic=True,
                      prefetch_queue_depth=1)
        def pipe():
            images = fn.external_source(name="images", dtype=types.UINT8, layout="HWC")
            images = fn.resize(images, resize_shorter=self.size, interp_type=types.INTERP_LINEAR, antialias=True)
            return fn.crop(images, crop=(self.size, self.size), out_of_bounds_policy="pad")
        p = pipe()
        p.build()
        return p

    @staticmethod
    def _outputs(out) -> list[np.ndarray]:
        out = out.as_cpu() if hasattr(out, "as_cpu") else out
        return [np.array(out[i]) for i in range(len(out))]

    def decode(self, blobs: list[np.ndarray]) -> list[np.ndarray]:
        """HWC uint8 arrays; raises RuntimeError (DALI's) if any blob fails."""
        if self._decode is None:
            self._decode = self._build_decode()
        self._decode.feed_input("encoded", blobs)
        try:
            (out,) = self._decode.run()
        except Exception:
            self._decode = None  # a pipeline that raised is not reused
            raise
        return self._outputs(out)

    def resize(self, images: list[np.ndarray]) -> list[np.ndarray]:
        if self._resize is None:
            self._resize = self._build_resize()
        self._resize.feed_input("images", images)
        (out,) = self._resize.run()
        return self._outputs(out)


@contextlib.contextmanager
def _native_stderr(into: list):
    """What DALI's C++ decoders print on file descriptor 2 while decoding (libjpeg's "Premature end of JPEG
    data" and the like) is kept for the error message instead of reaching the terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            into.append(f.read().decode(errors="replace"))


def _reason(native: str, e: Exception) -> str:
    """One line: the decoder's own complaint when it printed one, else the exception's last line."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", s).strip() for s in native.splitlines()]
    lines = [s.replace("[ERROR]", "").strip() for s in lines if s]
    if lines:
        return lines[-1][:160]
    text = [s.strip() for s in str(e).splitlines() if s.strip() and "no longer valid" not in s]
    after = text[text.index("encountered:") + 1:] if "encountered:" in text else []
    return (after[0] if after else text[-1] if text else type(e).__name__)[:160]


def _decode_one(decoder: Decoder, file: str, blob: np.ndarray, skip_bad: bool, bad: list) -> np.ndarray | None:
    native: list[str] = []
    try:
        if not blob.size:
            raise RuntimeError("empty file")
        with _native_stderr(native):
            return decoder.decode([blob])[0]
    except Exception as e:
        reason = _reason("".join(native), e)
        if not skip_bad:
            raise DataError(f"imagefolder: {file}: not a decodable image ({reason}); remove it, or pass "
                            f"--skip-bad-images to skip such files") from None
        bad.append((file, reason))
        return None


def decode_files(files: list[str], size: int, device: str = "cpu", skip_bad: bool = False, gray: bool = False,
                 progress=None) -> tuple[list[np.ndarray | None], list[tuple[str, str]]]:
    """Per file its decoded (one channel with `gray`, else RGB), resized HWC uint8 array (None for a skipped bad
    file), and the bad files with DALI's reason. A batch that fails is decoded again one file at a time to
    name the culprit."""
    decoder = Decoder(size, device, gray)
    out: list[np.ndarray | None] = []
    bad: list[tuple[str, str]] = []
    for start in range(0, len(files), DECODE_BATCH):
        chunk = files[start:start + DECODE_BATCH]
        blobs = [np.fromfile(f, dtype=np.uint8) for f in chunk]
        try:
            if not all(b.size for b in blobs):
                raise RuntimeError("an empty file")
            with _native_stderr([]):
                images: list[np.ndarray | None] = list(decoder.decode(blobs))
        except Exception:
            images = [_decode_one(decoder, f, b, skip_bad, bad) for f, b in zip(chunk, blobs)]
        todo = [i for i, a in enumerate(images) if a is not None and a.shape[:2] != (size, size)]
        if todo:
            for i, a in zip(todo, decoder.resize([images[i] for i in todo])):
                images[i] = a
        out += images
        if progress:
            progress(min(start + DECODE_BATCH, len(files)), len(files))
    return out, bad


def header_channels(blob: np.ndarray) -> int | None:
    """The channels a file's header declares, without decoding: 1 (grayscale, with or without alpha), 3 (colour,
    palette), 4 (CMYK JPEG) or None (a format whose header is not read here, or not an image: decoded as RGB)."""
    head = blob[:4096].tobytes()
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) > 25:
        return {0: 1, 4: 1, 2: 3, 3: 3, 6: 3}.get(head[25])
    if head[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(head):
            if head[i] != 0xFF:
                return None
            marker = head[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            length = int.from_bytes(head[i + 2:i + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                return head[i + 9]       # SOF: length, precision, height, width, then the component count
            i += 2 + length
        return None
    if head[:2] in (b"P2", b"P5"):
        return 1
    return None


def channels_of(blobs: list[np.ndarray], files: list[str], say=print) -> int:
    """1 when every file's header says grayscale; otherwise 3 (RGB), said once when the files are mixed."""
    counts: dict[int | None, int] = {}
    for b, f in zip(blobs, files):
        c = header_channels(b)
        if c is None and f.lower().endswith(READ_HEADERS):
            continue  # a PNG or JPEG whose header does not parse does not decode either: it is named then
        counts[c] = counts.get(c, 0) + 1
    if set(counts) == {1}:
        return 1
    if 1 in counts or 4 in counts:
        said = ", ".join(f"{n:,} {'grayscale' if c == 1 else 'CMYK' if c == 4 else 'colour or other'}"
                         for c, n in sorted(counts.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))
        say(f"the images are mixed ({said}); all are decoded to RGB")
    return 3
