"""TECO clip readers on small files written in TECO's layout: values, windows, and every bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from minisora.data import ClipError, ClipInfo, KINDS, clip_suffix, load_dataset_card, probe_clip, read_clip
from minisora.data.teco_minecraft import actions_path
from minisora.video import probe_mp4, write_mp4


def dmlab_clip(path, frames=30, size=8, seed=0, compressed=False, with_actions=True, **arrays):
    """Write a DMLab-style npz; returns (video, actions). Extra keyword arrays replace or add members."""
    rng = np.random.default_rng(seed)
    members = {"video": rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)}
    if with_actions:
        members["actions"] = rng.integers(0, 6, frames).astype(np.int32)
    members.update(arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    (np.savez_compressed if compressed else np.savez)(path, **members)
    return members["video"], members.get("actions")


def moving_frames(frames=40, size=32, seed=0):
    """Smooth, moving content (a gradient with a drifting square), so H.264 frames differ from each other."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    out = np.empty((frames, size, size, 3), np.uint8)
    base = rng.integers(0, 128, 3)
    for t in range(frames):
        img = np.stack([(x * 4 + t * 3 + base[0]) % 256, (y * 4 + base[1]) % 256, np.full_like(x, base[2])], -1)
        r, c = (2 + t) % (size - 8), (5 + 2 * t) % (size - 8)
        img[r : r + 8, c : c + 8] = 255
        out[t] = img
    return out


def minecraft_clip(path, frames=40, size=32, gop=8, n_actions=None, seed=0):
    """Write a Minecraft-style mp4 + sibling actions npz; returns (written frames, actions)."""
    video = moving_frames(frames, size, seed)
    write_mp4(path, video, gop=gop)
    actions = np.arange(n_actions if n_actions is not None else frames, dtype=np.int16) % 4
    np.savez(actions_path(path), actions=actions)
    return video, actions


# ---------------------------------------------------------------- DMLab


@pytest.mark.parametrize("compressed", [False, True])
def test_dmlab_full_and_window_reads_return_the_stored_bytes(tmp_path, compressed):
    path = tmp_path / "train" / "0" / "000001.npz"
    video, actions = dmlab_clip(path, frames=30, compressed=compressed)

    frames, acts = read_clip(path, "dmlab")
    assert frames.dtype == np.uint8 and frames.shape == (30, 8, 8, 3)
    np.testing.assert_array_equal(frames, video)
    assert acts.dtype == np.int64 and acts.shape == (30,)
    np.testing.assert_array_equal(acts, actions)

    for start, length in [(0, 1), (5, 10), (29, 1), (20, None)]:
        frames, acts = read_clip(path, "dmlab", start, length)
        stop = 30 if length is None else start + length
        np.testing.assert_array_equal(frames, video[start:stop])
        np.testing.assert_array_equal(acts, actions[start:stop])
    frames[0] = 0  # reads are writable arrays the caller owns


def test_dmlab_probe_reads_headers(tmp_path):
    path = tmp_path / "train" / "0" / "a.npz"
    dmlab_clip(path, frames=17, size=12)
    assert probe_clip(path, "dmlab") == ClipInfo(frames=17, height=12, width=12, has_actions=True)


def test_dmlab_clip_without_actions(tmp_path):
    path = tmp_path / "a.npz"
    video, _ = dmlab_clip(path, frames=6, with_actions=False)
    assert probe_clip(path, "dmlab") == ClipInfo(6, 8, 8, False)
    frames, acts = read_clip(path, "dmlab", 2, 3)
    assert acts is None
    np.testing.assert_array_equal(frames, video[2:5])


def test_dmlab_fortran_ordered_video_reads_correctly(tmp_path):
    path = tmp_path / "f.npz"
    video = np.asfortranarray(np.random.default_rng(1).integers(0, 256, (9, 4, 4, 3), dtype=np.uint8))
    np.savez(path, video=video)
    np.testing.assert_array_equal(read_clip(path, "dmlab", 3, 4)[0], video[3:7])


def test_window_longer_than_clip_names_both_numbers(tmp_path):
    path = tmp_path / "train" / "0" / "clip.npz"
    dmlab_clip(path, frames=12)
    with pytest.raises(ClipError) as e:
        read_clip(path, "dmlab", 0, 20)
    assert str(e.value) == f"{path}: has 12 frames < 20 required"
    assert e.value.path == str(path) and e.value.problem == "has 12 frames < 20 required"
    with pytest.raises(ClipError, match="has 12 frames < 13 required"):
        read_clip(path, "dmlab", 12)  # start past the end, to the end
    with pytest.raises(ValueError, match="start must be >= 0"):
        read_clip(path, "dmlab", -1, 2)


def _write_bad(tmp_path, case):
    path = tmp_path / "train" / "0" / f"{case}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    if case == "truncated":
        dmlab_clip(path, frames=10)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(500))
    elif case == "npy_not_npz":
        with open(path, "wb") as f:
            np.save(f, np.zeros((4, 8, 8, 3), np.uint8))
    elif case == "no_video":
        np.savez(path, frames=np.zeros((4, 8, 8, 3), np.uint8))
    elif case == "video_float":
        dmlab_clip(path, frames=4, video=np.zeros((4, 8, 8, 3), np.float32))
    elif case == "video_3d":
        dmlab_clip(path, frames=4, video=np.zeros((4, 8, 8), np.uint8))
    elif case == "video_rgba":
        dmlab_clip(path, frames=4, video=np.zeros((4, 8, 8, 4), np.uint8))
    elif case == "object_video":
        np.savez(path, video=np.array([np.zeros(3), "frame"], dtype=object))
    elif case == "object_actions":
        dmlab_clip(path, frames=2, actions=np.array([1, "left"], dtype=object))
    elif case == "actions_short":
        dmlab_clip(path, frames=10, actions=np.arange(9))
    elif case == "actions_float":
        dmlab_clip(path, frames=10, actions=np.zeros(10, np.float32))
    elif case == "missing":
        pass
    return path


BAD_DMLAB = {
    "truncated": "truncated or corrupt npz archive",
    "random_bytes": "not an npz (zip) archive",
    "npy_not_npz": "is a single .npy array, not an npz archive",
    "no_video": "no `video` array (members: frames)",
    "video_float": "`video` must be uint8 (T, H, W, 3), got float32 (4, 8, 8, 3)",
    "video_3d": "`video` must be uint8 (T, H, W, 3), got uint8 (4, 8, 8)",
    "video_rgba": "`video` must be uint8 (T, H, W, 3), got uint8 (4, 8, 8, 4)",
    "object_video": "`video` is an object array (object) that needs pickle, refused",
    "object_actions": "`actions` is an object array (object) that needs pickle, refused",
    "actions_short": "`actions` has 9 entries but `video` has 10 frames",
    "actions_float": "`actions` must be integers, got float32",
    "missing": "file not found",
}


@pytest.mark.parametrize("case", sorted(BAD_DMLAB))
def test_bad_dmlab_clip_is_a_clip_error_naming_file_and_problem(tmp_path, case):
    path = _write_bad(tmp_path, case)
    for call in (lambda: probe_clip(path, "dmlab"), lambda: read_clip(path, "dmlab")):
        with pytest.raises(ClipError) as e:
            call()
        assert e.value.path == str(path)
        assert e.value.problem == BAD_DMLAB[case] or e.value.problem.startswith(BAD_DMLAB[case])
        assert str(e.value).startswith(f"{path}: ")


# ---------------------------------------------------------------- Minecraft


@pytest.fixture(scope="module")
def mc_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("mc") / "train" / "3" / "000007.mp4"
    video, actions = minecraft_clip(path, frames=40, size=32, gop=8)
    return path, video, actions


def test_minecraft_probe(mc_clip):
    path, _, _ = mc_clip
    assert probe_clip(path, "minecraft") == ClipInfo(frames=40, height=32, width=32, has_actions=True)


def test_minecraft_full_read_matches_what_was_written(mc_clip):
    path, video, actions = mc_clip
    frames, acts = read_clip(path, "minecraft")
    assert frames.dtype == np.uint8 and frames.shape == (40, 32, 32, 3)
    assert np.abs(frames.astype(int) - video).mean() < 6  # H.264 at crf 18 is lossy, but close
    assert acts.dtype == np.int64
    np.testing.assert_array_equal(acts, actions)


@pytest.mark.parametrize("start,length", [(0, 5), (8, 8), (13, 9), (31, 9), (39, 1), (20, None)])
def test_minecraft_window_equals_slice_of_full_decode(mc_clip, start, length):
    path, _, actions = mc_clip
    full, _ = read_clip(path, "minecraft")
    frames, acts = read_clip(path, "minecraft", start, length)
    stop = 40 if length is None else start + length
    np.testing.assert_array_equal(frames, full[start:stop])  # decoded from the keyframe before `start`
    np.testing.assert_array_equal(acts, actions[start:stop])


def test_minecraft_short_clip_names_both_numbers(mc_clip):
    path, _, _ = mc_clip
    with pytest.raises(ClipError) as e:
        read_clip(path, "minecraft", 30, 20)
    assert str(e.value) == f"{path}: has 40 frames < 50 required"


def test_undecodable_mp4(tmp_path):
    path = tmp_path / "train" / "0" / "x.mp4"
    path.parent.mkdir(parents=True)
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    np.savez(actions_path(path), actions=np.zeros(3, np.int64))
    for call in (lambda: probe_clip(path, "minecraft"), lambda: read_clip(path, "minecraft")):
        with pytest.raises(ClipError) as e:
            call()
        assert e.value.path == str(path) and e.value.problem.startswith("undecodable mp4")


def test_missing_actions_file_names_expected_path(tmp_path):
    path = tmp_path / "train" / "0" / "x.mp4"
    write_mp4(path, moving_frames(4, 16))
    with pytest.raises(ClipError) as e:
        probe_clip(path, "minecraft")
    assert e.value.path == str(path)
    assert f"actions file {tmp_path / 'train' / '0' / 'x.npz'} not found" in str(e.value)


def test_minecraft_actions_problems_name_the_actions_file(tmp_path):
    path = tmp_path / "x.mp4"
    minecraft_clip(path, frames=6, size=16, n_actions=5)
    npz = tmp_path / "x.npz"
    with pytest.raises(ClipError) as e:
        read_clip(path, "minecraft")
    assert str(e.value) == f"{npz}: `actions` has 5 entries but x.mp4 has 6 frames"

    np.savez(npz, act=np.zeros(6, np.int64))
    with pytest.raises(ClipError, match=r"no `actions` array \(members: act\)") as e:
        probe_clip(path, "minecraft")
    assert e.value.path == str(npz)

    npz.write_bytes(b"not a zip")
    with pytest.raises(ClipError, match="not an npz") as e:
        probe_clip(path, "minecraft")
    assert e.value.path == str(npz)


# ---------------------------------------------------------------- shared


def test_kinds_and_suffixes():
    assert KINDS == ("dmlab", "minecraft")
    assert [clip_suffix(k) for k in KINDS] == [".npz", ".mp4"]
    with pytest.raises(ValueError, match="unknown clip kind 'kinetics'"):
        clip_suffix("kinetics")
    with pytest.raises(ValueError, match="unknown clip kind"):
        read_clip("x.npz", "kinetics")


def test_clip_error_survives_pickling():  # it crosses process boundaries in build_manifest(workers>1)
    e = pickle.loads(pickle.dumps(ClipError("/a/b.npz", "has 1 frames < 2 required")))
    assert (e.path, e.problem, str(e)) == ("/a/b.npz", "has 1 frames < 2 required",
                                           "/a/b.npz: has 1 frames < 2 required")


@pytest.mark.parametrize("kind", KINDS)
def test_dataset_card_matches_what_the_readers_read(tmp_path, kind):
    card = load_dataset_card(kind)
    clip = card["clip"]
    assert card["kind"] == kind and clip["suffix"] == clip_suffix(kind) and clip["channels"] == 3
    assert (clip["frames"], clip["height"], clip["width"]) == {"dmlab": (300, 64, 64),
                                                               "minecraft": (300, 128, 128)}[kind]
    assert card["splits"]["train"]["clips"] == {"dmlab": 39375, "minecraft": 194051}[kind]
    items = card["download"]["items"]
    assert items[0].endswith("_aa") and len(items) == {"dmlab": 3, "minecraft": 11}[kind]
    assert all(url.startswith(f"https://archive.org/download/{i}/") for i, url in zip(items, card["download"]["files"]))
    assert card["layout"].startswith(f"ROOT/{{train,test}}/<subdir>/<name>{clip['suffix']}")

    # A clip with the card's shape, in the card's layout, probes to the card's numbers.
    path = tmp_path / "train" / "0" / f"000000{clip['suffix']}"
    t, h, w = clip["frames"], clip["height"], clip["width"]
    if kind == "dmlab":
        dmlab_clip(path, frames=t, size=h)
    else:
        minecraft_clip(path, frames=t, size=h, gop=30)
        fps = probe_mp4(path)[3]
        assert fps == clip["fps"]  # write_mp4's default rate is the card's rate
    assert probe_clip(path, kind) == ClipInfo(t, h, w, True)
    assert load_dataset_card("dmlab").keys() == load_dataset_card("minecraft").keys()
    with pytest.raises(ValueError, match="no dataset card for 'ucf'"):
        load_dataset_card("ucf")


# ---------------------------------------------------------------- action ids (issue 12)
@pytest.mark.parametrize("value", [10**6, -5, 32768, np.iinfo(np.int64).max])
def test_out_of_range_action_ids_name_the_clip_the_value_and_the_range(tmp_path, value):
    video, actions = dmlab_clip(tmp_path / "train" / "c.npz", frames=6)
    bad = actions.astype(np.int64)
    bad[4] = value
    np.savez(tmp_path / "train" / "c.npz", video=video, actions=bad)
    clip = tmp_path / "train" / "c.npz"
    for call in (lambda: probe_clip(clip, "dmlab"), lambda: read_clip(clip, "dmlab")):
        with pytest.raises(ClipError, match=rf"c.npz: action id {value} at frame 4 is outside \[0, 32767\]") as e:
            call()
        assert "1 of 6 actions are out of range" in str(e.value)


def test_minecraft_out_of_range_actions_name_the_actions_file(tmp_path):
    mp4 = tmp_path / "m.mp4"
    minecraft_clip(mp4, frames=10, size=16)
    np.savez(actions_path(mp4), actions=np.full(10, 40000, np.int64))
    with pytest.raises(ClipError, match=r"m.npz: action id 40000 at frame 0 is outside \[0, 32767\]"):
        probe_clip(mp4, "minecraft")


def test_a_card_with_an_action_count_narrows_the_range(tmp_path, monkeypatch):
    import minisora.data
    from minisora.data.clips import action_range

    card = load_dataset_card("dmlab")
    monkeypatch.setattr(minisora.data, "load_dataset_card", lambda kind: {**card, "actions": {"count": 4}})
    action_range.cache_clear()
    try:
        assert action_range("dmlab")[:2] == (0, 3)
        video, _ = dmlab_clip(tmp_path / "c.npz", frames=5, with_actions=False)
        np.savez(tmp_path / "c.npz", video=video, actions=np.array([0, 1, 2, 3, 4]))
        card_range = r"action id 4 at frame 4 is outside \[0, 3\] \(the dmlab dataset card's 4 actions\)"
        with pytest.raises(ClipError, match=card_range):
            read_clip(tmp_path / "c.npz", "dmlab")
    finally:
        monkeypatch.undo()
        action_range.cache_clear()
    assert action_range("dmlab")[:2] == (0, 32767)  # the real card documents no count
