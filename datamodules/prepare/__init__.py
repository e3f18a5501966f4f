"""`fada prepare`: raw talking videos -> quality-scored strict and lenient WebDataset shards (SPEC 5b).

One input file passes through small, replaceable steps, all in-process (PyAV, OpenCV; no shell-outs):

    media.py     probe (reject: no video / no audio / zero frames / too short / undecodable), frames picked
                 by timestamp at 25 fps (variable frame rate, rotation tags), audio at 16 kHz mono
    shots.py     content-difference shot boundaries (HSV, as PySceneDetect's ContentDetector)
    faces.py     a pluggable face detector (Haar by default, `none` for pre-cropped input), IoU tracks with
                 short gaps interpolated and boxes smoothed, windows of 2-10 s with exactly one face
    scores.py    per-clip scores: face size and count, sharpness, head and background motion, speech
                 ratio, still video, audio-visual offset and confidence (SyncNet, or a weightless proxy)
    tiers.py     the filter config (two threshold sets) -> strict / lenient / rejected, with reasons
    pipeline.py  one input -> its clips and the reasons for what it drops
    run.py       `fada prepare`: each input in a spawned worker (timeout, crash costs that input), its
                 part written whole; every finished part -> shards per tier + manifest.json,
                 deterministic and resumable
    testmedia.py the test inputs: a real face (skimage's astronaut) animated, and its hard cases
"""
