"""Video files: read frame windows from mp4 (PyAV, seeking to the nearest keyframe) and write mp4/gif.

Frames are always uint8 arrays shaped (T, H, W, 3), RGB.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from minisora.errors import MinisoraError


class VideoError(MinisoraError, ValueError):
    """A video file that cannot be read; the message names the file and the problem."""


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    return frames


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = 20, crf: int = 18, gop: int = 30) -> None:
    """Write RGB frames as H.264 mp4 (yuv420p, a keyframe every `gop` frames so windows seek fast)."""
    import av  # PyAV, imported where video is read or written (training never needs it)

    frames = _check_frames(frames)
    t, h, w, _ = frames.shape
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "g": str(gop), "bf": "0", "preset": "fast"}
        stream.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def probe_mp4(path: str | Path) -> tuple[int, int, int, float]:
    """(frames, height, width, fps) of an mp4 without decoding it (counts packets if needed)."""
    import av

    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            n = stream.frames
            if not n:  # container did not record a frame count: count packets, no decoding
                n = sum(1 for p in container.demux(stream) if p.size > 0)
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            return int(n), stream.codec_context.height, stream.codec_context.width, fps
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{path}: cannot open video ({e})") from e


def read_mp4(path: str | Path, start: int = 0, length: int | None = None) -> np.ndarray:
    """Decode frames [start, start + length) of an mp4 as uint8 (T, H, W, 3).

    Seeks to the keyframe at or before `start` and decodes forward from there, so reading a
    short window does not decode the whole file. Frame indices come from presentation
    timestamps (constant frame rate, as TECO's Minecraft videos are).
    """
    import av

    path = Path(path)
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    out: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            tb = stream.time_base
            first_pts = stream.start_time or 0
            if start > 0 and rate:
                target = first_pts + int(Fraction(start) / Fraction(rate) / tb)
                container.seek(target, stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.pts is None or not rate:
                    raise VideoError(f"{path}: frames carry no timestamps, cannot index them")
                idx = round(float((frame.pts - first_pts) * tb * rate))
                if idx < start:
                    continue
                if length is not None and idx >= start + length:
                    break
                out.append(frame.to_ndarray(format="rgb24"))
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{path}: cannot decode video ({e})") from e
    if not out:
        return np.zeros((0, 0, 0, 3), np.uint8)
    return np.stack(out)


def write_gif(path: str | Path, frames: np.ndarray, fps: int = 10) -> None:
    """Write frames as a looping gif."""
    frames = _check_frames(frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
