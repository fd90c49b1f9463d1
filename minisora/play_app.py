"""The web side of `minisora play`: a Starlette app that serves the page and streams live frames over a WebSocket.

GET / is the page (minisora/play_page.html). /ws is one play session: each connection gets its own
LiveGenerator (minisora.live) over the shared pipeline. Messages:
- server -> page, binary: a 4-byte big-endian header length, a JSON header, then uint8 RGB pixels
  (H, W, 3) row-major. Header `type` "frame" (one generated frame: seq, index, action, its label,
  steps, gen_ms) or "context" (the context frames side by side: frames, height, width).
- server -> page, text JSON: "hello" (the action set, keys, steps), "recording", "recorded", "error".
- page -> server, text JSON: {"type": "action", "action": id} when the held key changes;
  {"type": "shown", "seq": n} after drawing frame n; {"type": "reset"}; {"type": "steps", "steps": n};
  {"type": "record"} (start, or stop and write).

The run-ahead rule: the server sends frame n, generates frame n + 1 (with the action held at that
moment) while the page draws n, and sends n + 1 only once the page has shown n. So it never holds more
than one frame the page has not shown. A frame is only proposed until it is sent (minisora.live:
`propose`, then `accept`): when the held action changes, the proposal under way is abandoned at its
next Euler step, or a finished one dropped, and made again for the new action. So the next frame sent
after a key press arrives shows it: one frame time, never behind a queue.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import threading
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from minisora.live import LiveFrame, LiveGenerator
from minisora.play_actions import ActionSet

PAGE = Path(__file__).with_name("play_page.html")
MAX_STEPS = 100  # the most Euler steps per frame the page may ask for


def pack(header: dict, pixels: np.ndarray) -> bytes:
    """One binary message: header length (4 bytes, big-endian), JSON header, uint8 pixels."""
    head = json.dumps(header).encode()
    return struct.pack(">I", len(head)) + head + np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()


def write_recording(root: Path, frames: list[np.ndarray], actions: list[int], fps: float) -> Path:
    """A played session as a TECO clip: ROOT/test/0000/NNNNN.npz (`video` uint8 (T, H, W, 3), `actions` int64 (T,),
    actions[t] the action frame t was generated with) and the same frames as NNNNN.mp4 beside it, so
    `minisora data manifest ROOT --kind dmlab` (or minecraft) accepts it. Returns the .npz path."""
    from minisora.video import write_mp4

    folder = root / "test" / "0000"
    folder.mkdir(parents=True, exist_ok=True)
    taken = [int(p.stem) for p in folder.glob("[0-9][0-9][0-9][0-9][0-9].*")]
    stem = folder / f"{max(taken, default=-1) + 1:05d}"
    video, acts = np.stack(frames), np.asarray(actions, dtype=np.int64)
    arrays = {"video": video} if (acts < 0).any() else {"video": video, "actions": acts}  # -1 is no clip action
    tmp_npz, tmp_mp4 = folder / f".{stem.name}.npz", folder / f".{stem.name}.mp4"  # hidden: not clips yet
    np.savez(tmp_npz, **arrays)
    write_mp4(tmp_mp4, video, fps=max(1, round(fps)))
    os.replace(tmp_mp4, stem.with_suffix(".mp4"))
    os.replace(tmp_npz, stem.with_suffix(".npz"))
    return stem.with_suffix(".npz")


class Session:
    """One WebSocket connection: its generator, the held action, the controls waiting to be applied, the recording."""

    def __init__(self, ws: WebSocket, live: LiveGenerator, actions: ActionSet, record_dir: Path, fps: float):
        self.ws, self.live, self.actions, self.record_dir, self.fps = ws, live, actions, record_dir, fps
        self.action = actions.idle
        self.controls: list[dict] = []
        self.shown, self.seq = -1, 0
        self.shown_event = asyncio.Event()
        self.recording: tuple[list[np.ndarray], list[int]] | None = None

    async def receive(self) -> None:
        """Read the page's messages until it leaves: the held action at once, controls for the loop."""
        while True:
            msg = json.loads(await self.ws.receive_text())
            kind = msg.get("type")
            if kind == "action":
                try:
                    self.action = self.actions.check(msg.get("action"))
                except (TypeError, ValueError) as e:
                    await self.ws.send_json({"type": "error", "message": str(e)})
            elif kind == "shown":
                self.shown = max(self.shown, int(msg.get("seq", -1)))
                self.shown_event.set()
            elif kind in ("reset", "steps", "record"):
                self.controls.append(msg)
                self.shown_event.set()  # a reset need not wait for the page

    async def wait_shown(self, seq: int) -> None:
        while self.shown < seq and not any(c["type"] == "reset" for c in self.controls):
            self.shown_event.clear()
            await self.shown_event.wait()

    async def send_context(self) -> None:
        ctx = await run_in_threadpool(self.live.context_pixels)  # (K, H, W, 3)
        k, h, w, _ = ctx.shape
        strip = ctx.transpose(1, 0, 2, 3).reshape(h, k * w, 3)  # the K frames side by side
        await self.ws.send_bytes(pack({"type": "context", "frames": k, "height": h, "width": k * w}, strip))

    async def send_frame(self, frame: LiveFrame) -> int:
        h, w, _ = frame.pixels.shape
        self.seq += 1
        header = {"type": "frame", "seq": self.seq, "index": frame.index, "action": frame.action,
                  "label": self.actions.label(frame.action), "steps": frame.steps,
                  "gen_ms": round(frame.seconds * 1000, 2), "height": h, "width": w}
        await self.ws.send_bytes(pack(header, frame.pixels))
        if self.recording is not None:
            self.recording[0].append(frame.pixels)
            self.recording[1].append(frame.action)
        return self.seq

    async def apply_controls(self) -> bool:
        """Apply what the page asked for since the last frame; True if the rollout went back to the context."""
        reset = False
        while self.controls:
            msg = self.controls.pop(0)
            if msg["type"] == "reset":
                await run_in_threadpool(self.live.reset)
                await self.send_context()
                reset = True
            elif msg["type"] == "steps":
                self.live.steps = min(MAX_STEPS, max(1, int(msg.get("steps", self.live.steps))))
            elif self.recording is None:  # "record": start
                self.recording = ([], [])
                await self.ws.send_json({"type": "recording"})
            else:  # "record": stop and write
                frames, acts = self.recording
                self.recording = None
                path = await run_in_threadpool(write_recording, self.record_dir, frames, acts, self.fps) \
                    if frames else None
                await self.ws.send_json({"type": "recorded", "path": str(path), "frames": len(frames)})
        return reset

    def _let_go(self, action: int) -> bool:
        return self.action != action

    async def propose(self) -> LiveFrame:
        """A frame for the action held now; abandoned and made again whenever the held action changes meanwhile."""
        while True:
            action = self.action
            frame = await run_in_threadpool(self.live.propose, action, partial(self._let_go, action))
            if frame is not None:
                return frame

    async def play(self) -> None:
        """The generation loop, under the run-ahead rule (the module docstring). A frame is decoded beside the
        cache update and the next frame's sampling (two threads: the VAE's convolutions and the DiT overlap)."""
        ahead: LiveFrame | None = None
        while True:
            if await self.apply_controls():
                ahead = None  # proposed before the reset: another timeline
            if ahead is None or ahead.action != self.action:  # made for a key no longer held: made again
                ahead = await self.propose()
            decoded = asyncio.ensure_future(run_in_threadpool(self.live.decode, ahead))
            await run_in_threadpool(self.live.accept, ahead)
            following = asyncio.ensure_future(self.propose())  # the next frame, while this one is decoded and drawn
            seq = await self.send_frame(await decoded)
            ahead = await following
            await self.wait_shown(seq)


def build_app(make_live: Callable[[], LiveGenerator], actions: ActionSet, record_dir: str | Path, fps: float,
              title: str) -> Starlette:
    """The play app: `make_live()` builds each connection's generator (over one shared pipeline)."""
    page = PAGE.read_text().replace("{{TITLE}}", title)

    async def index(request):
        return HTMLResponse(page)

    async def ws_play(ws: WebSocket):
        await ws.accept()
        live = await run_in_threadpool(make_live)
        session = Session(ws, live, actions, Path(record_dir), fps)
        await ws.send_json({"type": "hello", "steps": live.steps, **actions.describe()})
        await session.send_context()
        tasks = [asyncio.create_task(session.receive()), asyncio.create_task(session.play())]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in done:  # the page left: the normal end; anything else is a bug and is raised
            if not isinstance(task.exception(), WebSocketDisconnect):
                raise task.exception()

    return Starlette(routes=[Route("/", index), WebSocketRoute("/ws", ws_play)])


class PlayServer:
    """uvicorn serving `app` on host:port (port 0: a free one, bound now so `url` is known before serving)."""

    def __init__(self, app: Starlette, host: str, port: int):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)  # from now on a connection waits in the backlog until uvicorn serves it
        shown_host = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown_host}:{self.sock.getsockname()[1]}/"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="websockets-sansio",
                                                    lifespan="off"))
        self.thread: threading.Thread | None = None

    def run(self) -> None:
        """Serve until Ctrl-C (uvicorn's signal handling)."""
        self.server.run(sockets=[self.sock])

    def start(self) -> "PlayServer":
        """Serve from a background thread (tests, benchmarks); `stop()` ends it."""
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            threading.Event().wait(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.sock.close()
