"""`minisora play`: the live generator against the pipeline's rollout, the refusal of full attention, the key map,
the run-ahead rule over the WebSocket, and the page driven in a real headless browser (Debian's chromium).

The run is written by DiTPipeline.save_run around a small causal DiT with random weights (a trained one would
only be slower to make): the format `minisora train` writes, over a store encoded from synthetic DMLab clips.
"""

import asyncio
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from typer.testing import CliRunner

from _store_helpers import synthetic_store
from cli.main import app
from minisora.configs import TrainConfig
from minisora.live import LiveGenerator, PlayError
from minisora.model import VideoDiT
from minisora.pipeline import DiTPipeline
from minisora.play_actions import NULL_ACTION, action_set
from minisora.play_app import PlayServer
from minisora.store import LatentStore
from minisora.vae import build_vae, pixels_to_frames, tiny_vae_config
from stages.play import PlayConfig, prepare

CHROMEDRIVER = Path("/usr/bin/chromedriver")
NOOP, TURN_LEFT = 3, 1  # minisora.data.synthetic.DMLAB_ACTIONS: forward, turn_left, turn_right, noop


def random_dit(attention="causal", num_actions=4, patch_size=2) -> VideoDiT:
    """A small DiT whose weights are all random (a fresh adaLN-Zero DiT would predict v = 0)."""
    torch.manual_seed(0)
    dit = VideoDiT(in_channels=4, hidden_size=32, depth=2, num_heads=2, num_actions=num_actions, attention=attention,
                   patch_size=patch_size)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.2)
    return dit.eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """ROOT/store from 2 + 1 synthetic DMLab clips (16x16, tiny VAE); ROOT/causal and ROOT/full: pipelines on it."""
    root = tmp_path_factory.mktemp("play")
    synthetic_store(root, clips=2, test_clips=1)
    store = LatentStore(str(root / "store"))
    cfg = TrainConfig(store=str(root / "store"), out=str(root / "unused"), frames=4, use_actions=True)
    for attention in ("causal", "full"):
        dit = random_dit(attention)
        DiTPipeline.save_run(root / attention, dit, dit.state_dict(), store, cfg)
    return root


def play_cfg(runs: Path, **kw) -> PlayConfig:
    return PlayConfig(checkpoint=str(runs / "causal"), context_frames=2, device="cpu", precision="fp32",
                      record_dir=str(runs / "recorded"), **kw)


# ------------------------------------------------------------------------------ the live generator
@pytest.mark.parametrize("path,prediction", [("linear", "velocity"), ("gvp", "noise")])
def test_live_frames_equal_the_pipelines_chunk_1_kv_cache_rollout(path, prediction):
    torch.manual_seed(0)
    vae = build_vae("kl", tiny_vae_config("kl"))
    pipe = DiTPipeline(random_dit(num_actions=3), vae.model, FlowMatchEulerDiscreteScheduler(shift=1.0),
                       window_frames=4, latent_size=[4, 4], path=path, prediction=prediction)
    pipe.set_progress_bar_config(disable=True)
    k, n = 2, 7  # past the window (4): the cache rolls
    context = torch.randn(1, k, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    actions = torch.tensor([[0, 1, 2, 0, 1, 1, -1, 2, 0]])
    ref = pipe(context_latents=context, num_frames=k + n, num_inference_steps=3, chunk=1, actions=actions,
               kv_cache="rolling", generator=torch.Generator().manual_seed(5), output_type="latent").frames
    pixels = np.asarray(pixels_to_frames(pipe.decode_latents(ref)))  # (1, k + n, H, W, 3): the pipeline's uint8 output
    live = LiveGenerator(pipe, context, actions[0, :k].numpy(), steps=3, seed=5)
    frames = [live.step(int(a)) for a in actions[0, k:]]
    assert [f.index for f in frames] == list(range(n)) and [f.action for f in frames] == actions[0, k:].tolist()
    assert torch.equal(torch.cat([f.latent for f in frames], 1), ref[:, k:])  # the rollout itself: bit for bit
    # live decodes one frame at a time; the pipeline decodes all 7 at once, and a CPU's conv kernels may round a
    # batch of 7 differently from a batch of 1 (seen on an Intel Xeon: 3e-6, one uint8 level in 1 of 5376 values)
    one_by_one = [np.asarray(pixels_to_frames(pipe.decode_latents(ref[:, k + i:k + i + 1]))[0, 0]) for i in range(n)]
    np.testing.assert_array_equal(np.stack([f.pixels for f in frames]), np.stack(one_by_one))
    assert np.abs(np.stack([f.pixels for f in frames]).astype(int) - pixels[0, k:].astype(int)).max() <= 1
    live.reset()  # back to the context, the noise restarted: the same actions replay the same frames
    np.testing.assert_array_equal(live.step(int(actions[0, k])).pixels, frames[0].pixels)
    with pytest.raises(ValueError, match=r"action 3 must be in \[0, 3\)"):
        live.step(3)


def test_compiled_live_frames_equal_the_pipelines_compiled_rollout():
    """compile=True: once the cache holds window - 1 frames both move it into a KVRing and run the compiled passes
    (tests/test_kv_ring.py), so live play gives the compiled pipeline's frames bit for bit, also after a reset."""
    torch.manual_seed(0)
    pipe = DiTPipeline(random_dit(num_actions=3), build_vae("kl", tiny_vae_config("kl")).model,
                       FlowMatchEulerDiscreteScheduler(shift=1.0), window_frames=4, latent_size=[4, 4])
    pipe.set_progress_bar_config(disable=True)
    k, n = 2, 7
    context = torch.randn(1, k, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    actions = torch.tensor([[0, 1, 2, 0, 1, 1, -1, 2, 0]])
    ref = pipe(context_latents=context, num_frames=k + n, num_inference_steps=3, actions=actions, compile=True,
               generator=torch.Generator().manual_seed(5), output_type="latent").frames
    live = LiveGenerator(pipe, context, actions[0, :k].numpy(), steps=3, seed=5, compile=True)
    for _ in range(2):  # the second time after a reset, from a new cache
        latents = torch.cat([live.step(int(a)).latent for a in actions[0, k:]], 1)
        assert torch.equal(latents, ref[:, k:]) and live.cache.static  # on a KVRing by now
        live.reset()
        assert not live.cache.static  # 2 context frames: not full until the first frame is accepted


def test_a_full_attention_model_is_refused(runs):
    r = CliRunner().invoke(app, ["play", "--checkpoint", str(runs / "full"), "--device", "cpu"])
    assert r.exit_code == 1
    assert "attention='full'" in r.output and "causal" in r.output and "recomputes its whole window" in r.output
    with pytest.raises(PlayError, match="--clip test:: expected SPLIT:INDEX"):
        prepare(play_cfg(runs, clip="test:"))


def test_a_retrieved_memory_model_is_refused():
    pipe = DiTPipeline(random_dit(), build_vae("kl", tiny_vae_config("kl")).model, FlowMatchEulerDiscreteScheduler(),
                       window_frames=4, latent_size=[4, 4])
    pipe.register_to_config(retrieve_frames=2)  # as minisora.run_dir.build_pipeline does for such a run
    with pytest.raises(PlayError, match=r"retrieved memory \(--retrieve-frames 2\).*sample or eval it instead"):
        LiveGenerator(pipe, torch.zeros(1, 2, 4, 4, 4))


def test_keys_follow_the_datasets_actions(runs):
    synthetic = action_set({"kind": "dmlab", "root": str(runs / "data")}, 4)
    assert synthetic.names == ("forward", "turn_left", "turn_right", "noop") and synthetic.idle == NOOP
    assert synthetic.keys["ArrowLeft"] == synthetic.keys["KeyA"] == TURN_LEFT and synthetic.keys["KeyW"] == 0
    card = action_set({"kind": "dmlab", "root": str(runs / "elsewhere")}, 3)  # TECO's card names no actions
    assert card.names == ("action 0", "action 1", "action 2") and card.idle == NULL_ACTION
    assert card.keys == {"Digit1": 0, "Digit2": 1, "Digit3": 2} and "card does not name" in card.source


# ------------------------------------------------------------------------------ the server
def _header(message: bytes) -> dict:
    n = struct.unpack(">I", message[:4])[0]
    return json.loads(message[4:4 + n])


async def _frames_without_acks(url: str) -> tuple[list[str], list[dict]]:
    import websockets

    async with websockets.connect(url.replace("http://", "ws://") + "ws") as ws:
        texts, frames = [], []
        try:
            while True:
                m = await asyncio.wait_for(ws.recv(), timeout=1.5)
                if isinstance(m, str):
                    texts.append(json.loads(m)["type"])
                elif _header(m)["type"] == "frame":
                    frames.append(_header(m))
        except asyncio.TimeoutError:
            return texts, frames


def test_the_server_sends_one_frame_until_the_page_shows_it(runs):
    server = PlayServer(prepare(play_cfg(runs)).app, "127.0.0.1", 0).start()
    try:
        texts, frames = asyncio.run(_frames_without_acks(server.url))
    finally:
        server.stop()
    assert texts == ["hello"]
    assert [(f["seq"], f["action"], f["label"]) for f in frames] == [(1, NOOP, "3: noop")]  # then it waits


# ------------------------------------------------------------------------------ the page, in a browser
@pytest.fixture
def browser(tmp_path):
    if not CHROMEDRIVER.exists() or not shutil.which("chromium"):
        pytest.skip("needs Debian's chromium and chromium-driver (/usr/bin/chromedriver); `make test` installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1000,800"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def test_the_page_plays_in_a_browser_and_records_a_clip(runs, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    server = PlayServer(prepare(play_cfg(runs)).app, "127.0.0.1", 0).start()
    try:
        browser.get(server.url)
        state = lambda: browser.execute_script("return window.minisoraPlay")  # noqa: E731
        wait = WebDriverWait(browser, 30, poll_frequency=0.05)
        wait.until(lambda d: state()["frames"] >= 3)
        shown = lambda: browser.find_element(By.ID, "action").text  # noqa: E731
        assert shown() == "3: noop" and "turn_left" in browser.find_element(By.ID, "keys").text
        ActionChains(browser).key_down(Keys.ARROW_LEFT).perform()
        wait.until(lambda d: shown() == "1: turn_left")
        browser.find_element(By.ID, "record").click()
        start = state()["frames"]
        wait.until(lambda d: state()["frames"] >= start + 4)
        ActionChains(browser).key_up(Keys.ARROW_LEFT).perform()
        wait.until(lambda d: shown() == "3: noop")
        browser.find_element(By.ID, "record").click()
        wait.until(lambda d: state()["recorded"])
        browser.find_element(By.ID, "steps-up").click()
        wait.until(lambda d: state()["steps"] == 6)  # the page's default was 5
        before = state()["index"]
        browser.find_element(By.ID, "reset").click()
        wait.until(lambda d: state()["index"] < before)  # back to the context: the frames count from 0 again
        recorded, latencies = state()["recorded"][0], state()["latencies"]
        assert browser.find_element(By.ID, "fps").text not in ("", "-") and len(latencies) >= 2
    finally:
        server.stop()
    clip = np.load(recorded["path"])
    assert clip["video"].shape == (recorded["frames"], 16, 16, 3) and clip["video"].dtype == np.uint8
    assert {TURN_LEFT, NOOP} <= set(clip["actions"].tolist()) and Path(recorded["path"]).with_suffix(".mp4").is_file()
    r = CliRunner().invoke(app, ["data", "manifest", str(runs / "recorded"), "--kind", "dmlab",
                                 "--out", str(tmp_path / "manifest.json")])
    assert r.exit_code == 0, r.output
    clips = json.loads((tmp_path / "manifest.json").read_text())["clips"]
    assert [(c["frames"], c["has_actions"]) for c in clips] == [(recorded["frames"], True)]
