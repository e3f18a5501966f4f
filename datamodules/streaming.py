"""AvatarDataModule: WebDataset streaming of talking-head clips (SPEC 5), put together from

    shards.py    which shards exist and which of them each (rank, worker) reads
    clips.py     one sample -> one clip (ClipDecoder, its errors), the fixed validation clips
    streams.py   each worker's training stream, tier mixing, the crashed-sample record, resuming

    shards (tar) --split_shards(rank, worker)--> this worker's shards, shuffled each pass, cycled
      --wds.tarfile_to_samples--> raw samples {__key__, __url__, mp4, wav, json}
      --ClipDecoder (decoding.py: PyAV in a decode server, from bytes)--> items (shapes in `ClipDecoder.__call__`)

Every (rank, worker) streams its own disjoint shards and yields exactly `samples_per_worker`
items an epoch, so every rank sees the same number of batches. Bad data never stops training:
an undecodable, short or incomplete sample, or an unreadable tar, is skipped with a
`BadSampleWarning` naming shard URL and key, and counted in each item's `skipped` field.
A sample that crashes the (isolated) video decoder costs that sample only, and is remembered
(`CrashedSamples`). Nothing is unpickled: json via json.loads, wav via `wave`, video via PyAV.
"""
from __future__ import annotations

import json
import os
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader

from .audio_features import AudioFeatures, LogMelFeatures
from .clips import MAX_MEMBER_MB, QUALITY_KEYS, ClipDecoder, FixedClips, cache_spec
from .decoding import VIDEO_BACKENDS
from .shards import check_local_shards, is_manifest, read_manifest, resolve_shards
from .streams import ClipStream, CrashedSamples, TierMix


def model_settings(model) -> dict:
    """What the data takes from the model it feeds: the clip shape, the audio features and the preset
    (frame size; the latents `cached` reads). `fada fit` links each into `data.init_args` (LightningCLI
    argument linking, fada_lightning/cli.py); in Python, `AvatarDataModule.for_model(model, ...)`."""
    hparams = getattr(model, "hparams", {})
    return {"clip_frames": hparams.get("clip_frames"), "motion_frames": hparams.get("motion_frames"),
            "audio_features": getattr(model, "audio_features", None), "preset": getattr(model, "preset", None)}


class AvatarDataModule(L.LightningDataModule):
    """Streams training clips from WebDataset shards; validates on a small fixed set.

    Shards: a directory, a glob, brace notation, any URL webdataset opens, a list, or the manifest.json
    `fada prepare` writes (its strict tier; with `tier_weights`, the tiers named there). With
    `synthetic` (keyword arguments of `datamodules.synthetic.ensure_dataset`, e.g. {"root":
    "data/synthetic", "strict_clips": 512}) the synthetic world is generated on first use and
    its strict shards train when `train_shards` is empty. Tiers: `train_shards` as {tier: shards}
    (or, with `synthetic`, the manifest's tiers) mixed by `tier_weights` ({"strict": 2, "lenient": 1}:
    each item strict with probability 2/3); with `tier_weights` set each batch's "tier" names the shard
    set every clip came from, and only the weighted tiers stream. An epoch is `epoch_samples` items per
    rank, rounded down to whole batches per worker (at least one), identical on every rank.
    Each batch is a dict: frames (B, F, 3, H, W), motion (B, M, 3, H, W), ref (B, 3, H, W),
    audio (B, F, 2r + 1, L, D), mouth_open (B, F), quality (B, Q) (the json's scores named by
    `quality_keys`, default the synthetic world's; NaN where absent), key / tier (lists of B str), start (B,),
    skipped (B,) (that worker's skipped samples so far), worker (B,) (global id; -1 in validation),
    stream (B str), stream_epoch (B,), pulled (B,), in_epoch (B,) (where that worker's stream and epoch
    stand: a checkpoint keeps it, so a resumed run continues each stream instead of replaying its epoch).
    At scale: `cached` trains on the VAE latents and audio features `fada cache` added to the shards
    (batches then hold latents (B, M + F + 1, C, h, w) in place of frames / motion / ref; validation
    still decodes, for its sample videos); `shuffle_buffer` mixes clips of a worker's recent shards;
    `prefetch_factor` batches each worker prepares ahead (DataLoader's, default 2).
    Decoding (datamodules/decoding.py): `video_backend` "pyav", "decord" or "module:Class"; `isolate_decoding` runs it
    in a subprocess per worker, so a sample that crashes or hangs the decoder is skipped, named and
    appended to `crashed_samples` (default: crashed_samples.jsonl in the run's log folder), which later
    epochs and resumed runs skip without decoding. decord segfaults on some corrupt mp4s: keep it isolated.
    `max_member_mb` raises or lowers the size limits of `MAX_MEMBER_MB` ({"json": 4, ...}): a larger
    member is skipped before it is parsed. `shard_samples` ({shard: samples}, or a JSON file of it; the
    synthetic world's come from its manifest) lets a truncated shard count every sample it lost.
    The clip shape (`clip_frames`, `motion_frames`), `audio_features` and `preset` (frame size and the
    latents `cached` reads) are the model's: `fada fit` links them from it (`model_settings`)."""

    def __init__(self, train_shards: str | list[str] | dict[str, str | list[str]] | None = None,
                 val_shards: str | list[str] | None = None, audio_features: AudioFeatures | None = None,
                 clip_frames: int | None = None, motion_frames: int | None = None, audio_radius: int = 2,
                 frame_size: int | None = None, batch_size: int = 8, num_workers: int = 2, epoch_samples: int = 1024,
                 val_samples: int = 16, seed: int = 0, synthetic: dict | None = None,
                 tier_weights: dict[str, float] | None = None, quality_keys: list[str] | None = None,
                 cached: bool = False, shuffle_buffer: int = 0, prefetch_factor: int | None = None,
                 video_backend: str = "pyav", isolate_decoding: bool = True, crashed_samples: str | None = None,
                 max_member_mb: dict[str, float] | None = None, shard_samples: str | dict[str, int] | None = None,
                 preset: dict | None = None):
        super().__init__()
        if video_backend not in VIDEO_BACKENDS and ":" not in video_backend:
            raise ValueError(f"data.video_backend {video_backend!r} is not one of {VIDEO_BACKENDS} "
                             "nor a 'module:Class' of your own")
        # the model's settings (`model_settings`) are the model's hparams, not the data's
        self.save_hyperparameters(ignore=["audio_features", "clip_frames", "motion_frames", "preset"])
        self.audio_features, self.clip_frames, self.motion_frames = audio_features, clip_frames, motion_frames
        self.preset = preset
        self.decoder: ClipDecoder | None = None
        self.train_set: ClipStream | TierMix | None = None
        self._positions: dict[str, tuple[int, int, int]] = {}  # "tier/worker" -> (first_epoch, pulled, skipped)
        self._in_epoch: dict[int, int] = {}  # global worker -> items it yielded so far this epoch
        self.val_set: FixedClips | None = None

    @classmethod
    def for_model(cls, model, **kwargs) -> "AvatarDataModule":
        """The data module that feeds `model` (its `model_settings`), as `fada fit` links it."""
        return cls(**{**model_settings(model), **kwargs})

    def _make_decoder(self, cached: bool = False) -> ClipDecoder:
        """Clips of the model's shape with its audio features (defaults: 8 + 2 frames, log-mel);
        `cached`: read the latents and audio features of the model's preset from the shards instead."""
        frame_size = self.hparams.frame_size or (self.preset or {}).get("frame_size")
        quality = QUALITY_KEYS if self.hparams.quality_keys is None else tuple(self.hparams.quality_keys)
        cache = None
        if cached:
            if not isinstance(self.preset, dict):
                raise ValueError("data.cached reads the latents made for the model's preset: give the data module "
                                 "the model's preset (fada fit links it; in Python AvatarDataModule.for_model)")
            cache = cache_spec(self.preset)
        return ClipDecoder(self.audio_features or LogMelFeatures(), self.clip_frames or 8, self.motion_frames or 2,
                           self.hparams.audio_radius, frame_size, quality, cache=cache,
                           video_backend=self.hparams.video_backend, isolate=self.hparams.isolate_decoding,
                           max_member_mb={**MAX_MEMBER_MB, **(self.hparams.max_member_mb or {})})

    def _check_fits(self, model) -> None:
        """One clear error when the model this data feeds expects clips of another shape or other features."""
        theirs, decoder = model_settings(model), self.decoder
        mine = {"clip_frames": decoder.clip_frames, "motion_frames": decoder.motion_frames,
                "audio_features": _features(decoder.audio_features)}
        theirs["audio_features"] = _features(theirs["audio_features"]) if theirs["audio_features"] is not None else None
        wrong = [f"{k}: data {mine[k]}, model {theirs[k]}" for k in mine if theirs[k] is not None and theirs[k] != mine[k]]
        if wrong:
            raise ValueError(f"the data does not fit the model ({'; '.join(wrong)}): build it with "
                             "AvatarDataModule.for_model(model, ...) (fada fit links them)")

    def _shard_samples(self) -> dict[str, int]:
        """{shard url: samples it holds}, from the manifest training reads and `shard_samples`."""
        sizes, given, manifest = {}, self.hparams.shard_samples, self._manifest()
        if manifest and os.path.isfile(manifest):
            sizes.update(read_manifest(manifest)[1])
        if isinstance(given, str):
            with open(given) as f:
                given = json.load(f)
        sizes.update(given or {})
        return sizes

    def _manifest(self) -> str | None:
        """The shard manifest training reads: `train_shards` when it is one (fada prepare's), the synthetic
        world's when it trains (no train_shards), else None."""
        spec = self.hparams.train_shards
        if is_manifest(spec):
            return spec
        if self.hparams.synthetic and not spec:
            return os.path.join(self.hparams.synthetic["root"], "manifest.json")
        return None

    def _crashed_samples(self) -> CrashedSamples | None:
        """The record of samples that crashed a decoder: `crashed_samples`, else the run's log folder."""
        path = self.hparams.crashed_samples
        if path is None and self.trainer is not None and self.trainer.log_dir:
            path = os.path.join(self.trainer.log_dir, "crashed_samples.jsonl")
        return CrashedSamples(path) if path else None

    def _synthetic_val(self) -> dict:
        """Held-out synthetic clips: another seed, so identities and audio the model never trained on."""
        synthetic = self.hparams.synthetic
        return dict(root=os.path.join(synthetic["root"], "val"), seed=synthetic.get("seed", 0) + 1000,
                    strict_clips=self.hparams.val_samples, lenient_clips=0,
                    clips_per_shard=self.hparams.val_samples, progress=False,
                    **{k: synthetic[k] for k in ("size", "frames") if k in synthetic})

    def prepare_data(self):
        if self.hparams.synthetic:
            from .synthetic import ensure_dataset

            ensure_dataset(**self.hparams.synthetic)
            if not self.hparams.val_shards:
                ensure_dataset(**self._synthetic_val())

    def _train_urls(self) -> dict[str, list[str]]:
        """{tier: shard URLs}; one tier ("train") for a plain list of shards."""
        spec, tiers = self.hparams.train_shards, self.hparams.tier_weights
        if isinstance(spec, dict):
            urls = {tier: resolve_shards(shards) for tier, shards in spec.items()}
        elif self._manifest():  # fada prepare's or the synthetic world's: strict alone unless tier_weights mix
            manifest = self._manifest()
            if not is_manifest(spec) and not os.path.isfile(manifest):
                raise FileNotFoundError(f"synthetic dataset {manifest} missing: prepare_data did not run here")
            listed = read_manifest(manifest)[0]
            urls = {tier: listed[tier] for tier in (listed if tiers else ["strict"])}
        elif spec:
            urls = {"train": resolve_shards(spec)}
        else:
            urls = {"train": []}
        if tiers is not None:
            unknown = sorted(set(tiers) - set(urls))
            if unknown:
                raise ValueError(f"tier_weights name tiers {unknown} that train_shards does not have ({sorted(urls)})")
            urls = {tier: urls[tier] for tier in tiers}
        elif len(urls) > 1:
            raise ValueError(f"train_shards has tiers {sorted(urls)}: give tier_weights to mix them")
        for tier, tier_urls in urls.items():
            check_local_shards(tier_urls, f"train_shards[{tier}]" if tier != "train" else "train_shards")
        return urls

    def setup(self, stage: str | None = None):
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.decoder = self.decoder or self._make_decoder()
        if self.trainer is not None and self.trainer.lightning_module is not None:
            self._check_fits(self.trainer.lightning_module)
        if stage in (None, "fit") and self.train_set is None:
            hp = self.hparams
            workers = max(1, hp.num_workers)
            per_worker = max(1, hp.epoch_samples // (workers * hp.batch_size)) * hp.batch_size
            if per_worker * workers != hp.epoch_samples:
                warnings.warn(f"epoch_samples {hp.epoch_samples} -> {per_worker * workers} per rank "
                              f"(whole batches of {hp.batch_size} on each of {workers} workers)")
            decoder = self._make_decoder(cached=True) if hp.cached else self.decoder
            crashed = self._crashed_samples()
            sizes = self._shard_samples()
            streams = {tier: ClipStream(urls, decoder, per_worker, rank, world_size, hp.num_workers, hp.seed,
                                        hp.shuffle_buffer, crashed, name=tier, shard_samples=sizes)
                       for tier, urls in self._train_urls().items()}
            if hp.tier_weights is None:
                (self.train_set,) = streams.values()
            else:
                self.train_set = TierMix(streams, hp.tier_weights, per_worker)
            self._resume_streams()
        val_shards = self.hparams.val_shards
        if not val_shards and self.hparams.synthetic:
            val_shards = os.path.join(self._synthetic_val()["root"], "strict")
        if stage in (None, "fit", "validate", "test", "predict") and self.val_set is None and val_shards:
            urls = resolve_shards(val_shards)
            check_local_shards(urls, "val_shards")
            self.val_set = FixedClips(urls, self.decoder, self.hparams.val_samples)

    # ---- resuming: where each worker's stream stands, in the checkpoint ----------------------------
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Note where each stream of this rank stands after the batch about to be trained on (the
        DataLoader's read-ahead is not counted, so a resumed run neither skips nor replays a clip)."""
        if self.trainer is not None and self.trainer.training and "pulled" in batch:
            for stream, worker, epoch, pulled, skipped, in_epoch in zip(
                    batch["stream"], batch["worker"].tolist(), batch["stream_epoch"].tolist(),
                    batch["pulled"].tolist(), batch["skipped"].tolist(), batch["in_epoch"].tolist()):
                key = f"{stream}/{worker}"
                if pulled > self._positions.get(key, (0, -1, 0))[1]:
                    self._positions[key] = (epoch, pulled, skipped)
                self._in_epoch[worker] = in_epoch  # a batch is one worker's consecutive items
        return batch

    def state_dict(self) -> dict:
        """{"streams": {"tier/global worker": [first_epoch, pulled, skipped]}, "in_epoch": {global
        worker: items yielded this epoch}}, over all ranks (every rank takes part in a save), and the
        training faces' `face_crop` where known."""
        state = {"streams": {k: list(v) for k, v in self._positions.items()}, "in_epoch": dict(self._in_epoch)}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, state)
            state = {part: {k: v for rank_state in gathered for k, v in rank_state[part].items()} for part in state}
        crop = self.face_crop()
        return {**state, "face_crop": crop} if crop else state

    def face_crop(self) -> dict | None:
        """How the training faces were cropped, for `fada sample` to crop a reference image the same way:
        the manifest's `crop` (fada prepare's detector, margin, frame size); the synthetic world's frames
        are whole faces (detector none); None when unknown (shards from elsewhere)."""
        spec = self.hparams.train_shards
        if is_manifest(spec):
            with open(spec) as f:
                return json.load(f).get("crop")
        if self.hparams.synthetic and not spec:
            return {"detector": "none", "margin": 1.0}
        return None

    def load_state_dict(self, state: dict) -> None:
        self._positions = {k: tuple(v) for k, v in state.get("streams", {}).items()}
        self._in_epoch = {int(k): v for k, v in state.get("in_epoch", {}).items()}
        self._resume_streams()
        if self._positions:  # Lightning cannot see that this stream resumes mid-epoch; it does
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")

    def _resume_streams(self) -> None:
        streams = (list(self.train_set.tiers.values()) if isinstance(self.train_set, TierMix)
                   else [self.train_set] if self.train_set is not None else [])
        for stream in streams:
            stream.resume = {int(key.rsplit("/", 1)[1]): position for key, position in self._positions.items()
                             if key.rsplit("/", 1)[0] == stream.name}
        if self.train_set is not None:
            self.train_set.resume_in_epoch = dict(self._in_epoch)

    def _loader(self, dataset, **kw) -> DataLoader:
        """A DataLoader with its own generator: a loader's first iterator draws its workers' base seed, which
        from the global generator would shift every later noise draw of training (so a run's noise would
        depend on when it first validated, and a resumed run's on where it resumed). The streams are seeded
        by `seed` themselves (streams.py)."""
        workers = self.hparams.num_workers
        prefetch = {"prefetch_factor": self.hparams.prefetch_factor} if workers > 0 else {}
        return DataLoader(dataset, batch_size=self.hparams.batch_size, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                          generator=torch.Generator().manual_seed(self.hparams.seed), **prefetch, **kw)

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None:  # a resumed run continues with fresh clip draws
            self.train_set.set_epoch(self.trainer.current_epoch)
        return self._loader(self.train_set)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []

    test_dataloader = predict_dataloader = val_dataloader  # the fixed held-out clips


def _features(features) -> tuple:
    """What identifies audio features for the model: their class, layers and width."""
    return type(features).__name__, features.num_layers, features.dim
