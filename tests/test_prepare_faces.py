"""`fada prepare`'s faces step (detectors, tracks, single-face windows, crops) on the talking astronaut of
datamodules/prepare/testmedia.py, whose own behaviour (mouth on the audio clock, cut, pan) is checked first."""
from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest

from datamodules.prepare import testmedia
from datamodules.prepare.faces import (HaarDetector, NoDetector, Track, crop_box, crop_frames, face_counts, iou,
                                       make_detector, moving_average, single_face_windows, track_faces)

pytest.importorskip("skimage")
FPS = 25


@pytest.fixture(scope="module")
def haar():
    return HaarDetector()


def expected_face(size=(256, 256)) -> np.ndarray:
    """Where the still (head_motion 0) portrait's face box lands in a frame of `size` (both 256: the framing)."""
    _, face, _ = testmedia.portrait_photo()
    assert size == (256, 256)
    return face


# --- test media -------------------------------------------------------------------------------------------

def mouth_darkness(frames: np.ndarray) -> np.ndarray:
    """Mean darkness of the still portrait's mouth region per frame."""
    _, _, (cx, cy, half_w, half_h) = testmedia.portrait_photo()
    region = frames[:, int(cy - half_h):int(cy + half_h) + 1, int(cx - half_w):int(cx + half_w) + 1]
    return 255 - region.mean(axis=(1, 2, 3))


def test_voice_and_loudness():
    audio = testmedia.voice(3.0)
    assert audio.dtype == np.float32 and audio.shape == (48000,)
    loud = testmedia.loudness(audio)
    assert loud.shape == (75,) and loud.max() == 1.0 and loud.min() >= 0
    assert 0.1 < (loud < 0.05).mean() < 0.7  # pauses and syllables
    assert np.allclose(testmedia.loudness(audio, times=np.arange(75) / FPS), loud)
    resampled = testmedia.voice(3.0, sample_rate=44100)
    assert resampled.shape == (132300,)
    assert np.corrcoef(testmedia.loudness(resampled, sample_rate=44100), loud)[0, 1] > 0.99


def test_mouth_opens_with_the_loudness_at_each_frames_time():
    frames, audio = testmedia.talking_portrait(4.0, head_motion=0.0)
    assert frames.shape == (100, 256, 256, 3) and frames.dtype == np.uint8
    loud = testmedia.loudness(audio)
    assert np.corrcoef(mouth_darkness(frames), loud)[0, 1] > 0.95
    assert np.corrcoef(mouth_darkness(frames)[1:], loud[:-1])[0, 1] < 0.9  # one frame off is worse
    closed, _ = testmedia.talking_portrait(4.0, head_motion=0.0, mouth=False)
    assert np.ptp(mouth_darkness(closed)) == 0


def test_variable_frame_rate_renders_each_frame_at_its_own_time():
    regular, audio = testmedia.talking_portrait(2.0)
    times = np.array([0, 1, 2, 5, 6, 13, 14, 30, 49]) / FPS  # irregular gaps
    frames, vfr_audio = testmedia.talking_portrait(2.0, frame_times=times)
    assert np.array_equal(vfr_audio, audio)
    assert np.array_equal(frames, regular[np.rint(times * FPS).astype(int)])


def test_media_is_deterministic_by_seed():
    a, wav_a = testmedia.degraded(1.0, seed=3)
    b, wav_b = testmedia.degraded(1.0, seed=3)
    c, wav_c = testmedia.degraded(1.0, seed=4)
    assert np.array_equal(a, b) and np.array_equal(wav_a, wav_b)
    assert not np.array_equal(a, c) and not np.array_equal(wav_a, wav_c)


def test_cut_pan_and_still_image_move_as_described():
    frames, _ = testmedia.with_cut(2.0)
    change = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))
    assert change.argmax() == 24 and change[24] > 10 * np.delete(change, 24).max()  # cut between frames 24, 25
    frames, _ = testmedia.camera_pan(1.0)
    grey = [np.float32(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)) for frame in frames]
    shifts = np.array([cv2.phaseCorrelate(a, b)[0] for a, b in zip(grey[:-1], grey[1:])])
    assert np.median(np.abs(shifts[:, 0])) == pytest.approx(4.0, abs=0.3) and np.abs(shifts[:, 1]).max() < 0.3
    frames, audio = testmedia.still_image(1.0)
    assert (frames == frames[:1]).all() and testmedia.loudness(audio).max() == 1.0


# --- detectors --------------------------------------------------------------------------------------------

def test_haar_finds_the_astronaut_in_nearly_every_frame(haar):
    frames, _ = testmedia.talking_portrait(4.0)
    detections = [haar(frame) for frame in frames[::2]]
    assert all(boxes.dtype == np.float32 and boxes.shape[1:] == (4,) for boxes in detections)
    on_face = [len(boxes) == 1 and iou(boxes, expected_face())[0, 0] > 0.6 for boxes in detections]
    assert np.mean(on_face) >= 0.95


def test_haar_counts_two_faces_and_no_face(haar):
    frames, _ = testmedia.two_faces(1.0)
    assert np.mean(face_counts([haar(frame) for frame in frames[::2]]) == 2) >= 0.9
    frames, _ = testmedia.no_face(1.0)
    assert face_counts([haar(frame) for frame in frames[::2]]).sum() == 0


def test_haar_pickles_for_worker_processes(haar):
    frame = testmedia.talking_portrait(0.04)[0][0]
    assert np.array_equal(pickle.loads(pickle.dumps(haar))(frame), haar(frame))


def test_make_detector_by_name(tmp_path, monkeypatch):
    frame = np.zeros((90, 160, 3), np.uint8)
    assert isinstance(make_detector("none"), NoDetector)
    assert make_detector("none")(frame).tolist() == [[0, 0, 160, 90]]
    assert isinstance(make_detector("haar", min_neighbors=3), HaarDetector)
    (tmp_path / "my_faces.py").write_text(
        "import numpy as np\n"
        "class CentreBox:\n"
        "    def __init__(self, side=10):\n"
        "        self.side = side\n"
        "    def __call__(self, frame):\n"
        "        h, w = frame.shape[:2]\n"
        "        return np.array([[w / 2 - self.side / 2, h / 2 - self.side / 2,\n"
        "                          w / 2 + self.side / 2, h / 2 + self.side / 2]], np.float32)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert make_detector("my_faces:CentreBox", side=20)(frame).tolist() == [[70, 35, 90, 55]]
    with pytest.raises(ValueError, match="nor a 'module:Class'"):
        make_detector("mtcnn")


@pytest.mark.parametrize("name, kwargs", [("haar", "cascade"), ("yunet", "weights")])
def test_missing_model_file_is_named(tmp_path, name, kwargs):
    missing = str(tmp_path / "nowhere" / "model.file")
    with pytest.raises(FileNotFoundError, match="nowhere/model.file"):
        make_detector(name, **{kwargs: missing})


def test_opencv_without_bundled_cascades_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(cv2.data, "haarcascades", str(tmp_path))  # as opencv 5.x: no cascade files
    with pytest.raises(FileNotFoundError, match='pip install "opencv-python-headless<5"'):
        HaarDetector()


def test_unreadable_cascade_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<opencv_storage></opencv_storage>")
    with pytest.raises(ValueError, match="not a readable OpenCV cascade"):
        HaarDetector(cascade=str(bad))


# --- tracks -----------------------------------------------------------------------------------------------

def linear_boxes(n: int, start=(10.0, 20.0), velocity=(2.0, -0.5), side=40.0) -> np.ndarray:
    xy = np.array(start) + np.arange(n)[:, None] * np.array(velocity)
    return np.concatenate([xy, xy + side], axis=1).astype(np.float32)


def test_gap_is_interpolated_linearly_in_one_track():
    truth = linear_boxes(30)
    detections = [truth[t:t + 1] if not 10 <= t < 13 else np.zeros((0, 4)) for t in range(30)]
    (track,) = track_faces(detections, max_gap=5, smooth=5)
    assert (track.start, track.stop) == (0, 30)
    np.testing.assert_allclose(track.boxes, truth, atol=1e-4)  # linear: interpolation and smoothing exact
    assert np.flatnonzero(~track.detected).tolist() == [10, 11, 12]


@pytest.mark.parametrize("gap, tracks", [(5, 1), (6, 2)])
def test_gap_longer_than_max_gap_splits_the_track(gap, tracks):
    truth = linear_boxes(40, velocity=(0.2, 0.0))
    detections = [truth[t:t + 1] if not 10 <= t < 10 + gap else np.zeros((0, 4)) for t in range(40)]
    found = track_faces(detections, max_gap=5)
    assert len(found) == tracks
    assert sum(len(track.boxes) for track in found) == 40 - (gap if tracks == 2 else 0)


def test_two_faces_keep_their_own_tracks():
    left, right = linear_boxes(20, start=(0, 0)), linear_boxes(20, start=(150, 0), velocity=(-2.0, 0))
    detections = [np.stack([right[t], left[t]]) if t % 2 else np.stack([left[t], right[t]]) for t in range(20)]
    detections[7] = left[7:8]  # the right face missed once
    a, b = track_faces(detections, smooth=1)
    assert {(a.start, a.stop), (b.start, b.stop)} == {(0, 20)}
    first, second = sorted([a, b], key=lambda track: track.boxes[0, 0])
    np.testing.assert_allclose(first.boxes, left)
    np.testing.assert_allclose(second.boxes, right, atol=1e-4)
    assert second.detected.sum() == 19


def test_smoothing_keeps_a_constant_box_and_reduces_jitter():
    still = np.tile(np.float32([[30.3, 40.7, 95.1, 105.9]]), (50, 1))
    (track,) = track_faces([box[None] for box in still], smooth=7)
    np.testing.assert_allclose(track.boxes, still, rtol=0, atol=1e-5)
    truth = linear_boxes(200, velocity=(0.5, 0.25))
    jittery = truth + np.random.default_rng(0).normal(0, 1.5, truth.shape).astype(np.float32)
    (track,) = track_faces([box[None] for box in jittery], smooth=5)
    assert np.var(track.boxes - truth) < 0.4 * np.var(jittery - truth)  # ~1/5 inside, 1 at the two ends


def test_moving_average_matches_a_slow_loop():
    x = np.random.default_rng(1).normal(size=(23, 4))
    for window in (1, 2, 5, 8, 99):
        half = (window - 1) // 2
        slow = np.array([x[max(i - min(half, i, 22 - i), 0):i + min(half, i, 22 - i) + 1].mean(0) for i in range(23)])
        np.testing.assert_allclose(moving_average(x, window), slow, atol=1e-12)


def test_iou():
    a = np.array([[0, 0, 10, 10], [0, 0, 0, 0]])
    b = np.array([[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    np.testing.assert_allclose(iou(a, b), [[50 / 150, 1, 0], [0, 0, 0]])
    assert iou(a, np.zeros((0, 4))).shape == (2, 0)


def test_tracks_on_detected_media(haar):
    frames, _ = testmedia.face_leaving(4.0)
    detections = [haar(frame) for frame in frames]
    tracks = track_faces(detections, min_length=10)
    assert len(tracks) == 1 and tracks[0].start == 0 and 50 <= tracks[0].stop < 90  # gone in the last quarter


# --- single-face windows ----------------------------------------------------------------------------------

def track(start: int, stop: int) -> Track:
    n = stop - start
    return Track(start, np.zeros((n, 4), np.float32), np.ones(n, bool))


def spans(windows):
    return [(start, stop) for start, stop, _ in windows]


def test_long_span_is_cut_into_max_length_clips():
    face = track(0, 23 * FPS)
    windows = single_face_windows([face], 23 * FPS, [(0, 23 * FPS)])
    assert spans(windows) == [(0, 250), (250, 500), (500, 575)] and all(w[2] is face for w in windows)


@pytest.mark.parametrize("seconds, clips", [(1.9, 0), (2.0, 1)])
def test_span_shorter_than_min_frames_gives_none(seconds, clips):
    n = int(round(seconds * FPS))
    assert len(single_face_windows([track(0, n)], n, [(0, n)], min_frames=50)) == clips


def test_windows_split_at_shot_boundaries_and_where_two_faces_are_alive():
    windows = single_face_windows([track(0, 300)], 300, [(0, 120), (123, 300)])
    assert spans(windows) == [(0, 120), (123, 300)]
    a, b = track(0, 200), track(100, 400)
    windows = single_face_windows([a, b], 400, [(0, 400)])
    assert spans(windows) == [(0, 100), (200, 400)] and windows[0][2] is a and windows[1][2] is b
    back_to_back = single_face_windows([track(0, 100), track(100, 200)], 200, [(0, 200)])
    assert spans(back_to_back) == [(0, 100), (100, 200)]  # one face hands over to another: two windows
    assert spans(single_face_windows([track(0, 400)], 400, [(0, 400)], trim=10)) == [(10, 260), (260, 390)]
    assert spans(single_face_windows([track(0, 300)], 300, [(0, 300)], trim=10)) == [(10, 260)]  # tail 30 < 50
    assert single_face_windows([], 300, [(0, 300)]) == []


# --- crops ------------------------------------------------------------------------------------------------

def test_crop_box_convention():
    x0, y0, side = crop_box(np.array([100, 50, 140, 110]), margin=1.5)  # w 40, h 60, centre (120, 80)
    assert (x0, y0, side) == (75, 35, 90)


def test_crop_frames_centred_and_at_the_edge():
    frames = np.random.default_rng(0).integers(0, 256, (2, 120, 160, 3), dtype=np.uint8)
    centred = crop_frames(frames, np.array([[60, 40, 100, 80]] * 2), margin=2.0, size=80)  # square 40..120, 20..100
    assert np.array_equal(centred, frames[:, 20:100, 40:120])
    corner = crop_frames(frames, np.array([[-10, -10, 20, 20]] * 2), margin=2.0, size=60)  # square -25..35
    assert corner.shape == (2, 60, 60, 3)
    assert np.array_equal(corner[:, 25:, 25:], frames[:, :35, :35])
    assert (corner[:, :25, :25] == frames[:, :1, :1]).all()  # the corner pixel replicated
    assert np.array_equal(corner[:, 30, :25], np.repeat(frames[:, 5, :1], 25, axis=1))
    outside = crop_frames(frames, np.array([[500, 500, 540, 540]] * 2), margin=1.0, size=16)
    assert (outside == frames[:, -1:, -1:]).all()


# ---- fada sample crops a reference face as prepare cropped the training clips --------------------------------
HAAR_CROP = {"detector": "haar", "detector_args": {}, "margin": 1.8, "analysis_size": 256}


def test_fada_sample_crops_the_reference_face_as_the_training_clips_were(tmp_path):
    from PIL import Image

    from datamodules.prepare.testmedia import portrait_photo
    from fada_lightning.sample import crop_reference
    from fada_lightning.video_io import read_image

    photo, face, _ = portrait_photo()
    Image.fromarray(photo).save(tmp_path / "portrait.png")
    cropped = crop_reference(tmp_path / "portrait.png", 64, HAAR_CROP)
    boxes = HaarDetector()(photo)  # 256 px: the analysis size, so found where prepare would find it
    assert len(boxes) == 1 and iou(boxes, np.float32(face)[None])[0, 0] > 0.6
    assert np.array_equal(cropped, crop_frames(photo[None], boxes, 1.8, 64)[0])  # prepare's crop of that box
    whole = read_image(tmp_path / "portrait.png", 64)
    assert np.abs(cropped.astype(int) - whole).mean() > 20  # not the uncropped photo squashed
    for crop in (None, {"detector": "none", "margin": 1.0}):  # synthetic-world models: the image as given
        assert np.array_equal(crop_reference(tmp_path / "portrait.png", 64, crop), whole)


def test_fada_sample_says_when_it_finds_no_face_or_several(tmp_path):
    from PIL import Image

    from fada_lightning.sample import crop_reference

    frames, _ = testmedia.no_face(0.04)
    Image.fromarray(frames[0]).save(tmp_path / "cup.png")
    with pytest.raises(ValueError, match="cup.png: the haar face detector .* finds no face; .* --no-crop"):
        crop_reference(tmp_path / "cup.png", 64, HAAR_CROP)
    frames, _ = testmedia.two_faces(0.04)
    Image.fromarray(frames[0]).save(tmp_path / "two.png")
    with pytest.warns(UserWarning, match="two.png: 2 faces found; the largest is used"):
        assert crop_reference(tmp_path / "two.png", 64, HAAR_CROP).shape == (64, 64, 3)


def test_the_training_face_crop_is_read_from_the_checkpoint():
    from fada_lightning.sample import training_face_crop

    recorded = {"state_dict": {}, "AvatarDataModule": {"streams": {}, "face_crop": HAAR_CROP}}
    assert training_face_crop(recorded) == HAAR_CROP
    assert training_face_crop({"state_dict": {}, "AvatarDataModule": {"streams": {}}}) is None
