"""Audio features against the Kaldi reference, audio sources, captions and tokenization."""


import numpy as np
import pytest

from internvideo2_jax.data import audio as A, synthetic, text as T


def test_fbank_matches_kaldi_reference():
  knf = pytest.importorskip("kaldi_native_fbank")
  rng = np.random.default_rng(0)
  n = 16000 * 10
  wave = (0.1 * rng.standard_normal(n) + 0.3 * np.sin(np.arange(n) * 0.05)).astype(np.float32)
  ours = A.kaldi_fbank(wave * 32768)
  opts = knf.FbankOptions()
  opts.frame_opts.dither = 0.0           # torchaudio's default (Kaldi's is 1)
  opts.frame_opts.samp_freq = 16000
  opts.mel_opts.num_bins = 64
  opts.mel_opts.high_freq = 0.0          # Nyquist, torchaudio's default
  fb = knf.OnlineFbank(opts)
  fb.accept_waveform(16000, (wave * 32768).tolist())
  fb.input_finished()
  ref = np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])
  assert ours.shape == ref.shape == (998, 64)
  np.testing.assert_allclose(ours, ref, atol=5e-4)


def test_features_normalised_padded_and_missing():
  wave = np.sin(np.arange(16000 * 3) * 0.1).astype(np.float32) * 0.5
  feats, has = A.fbank_features(wave)
  assert has and feats.shape == (998, 64)
  raw = A.kaldi_fbank(wave * 32768)
  np.testing.assert_allclose(feats[:len(raw)], (raw - 15.41663) / (2 * 6.55582), rtol=1e-5)
  np.testing.assert_array_equal(feats[len(raw):], 0)  # short clips: fbank zero-padded
  zeros, has = A.fbank_features(None)
  assert not has and zeros.shape == (998, 64) and not zeros.any()
  rng = np.random.default_rng(0)
  long = np.arange(16000 * 12, dtype=np.float32)
  crop = A.crop_or_pad(long, 10.0, rng=rng)
  assert len(crop) == 160000 and crop[0] == long[int(crop[0])]


def test_audio_from_video_track_and_separate_file(tmp_path):
  rng = np.random.default_rng(1)
  tone = synthetic.render_tone(rng, "beep", 2.0)
  frames = synthetic.render_clip(rng, 16, 32, shape="circle", colour="red", direction="up")
  synthetic.write_mp4(tmp_path / "v.mp4", frames, audio=tone)
  wave = A.load_waveform(str(tmp_path / "v.mp4"))
  assert abs(len(wave) - 32000) < 2048
  spectrum = np.abs(np.fft.rfft(wave[4000:20000]))
  assert abs(np.argmax(spectrum) * 16000 / 16000 - 1760) < 20  # the beep's pitch survives AAC
  synthetic.write_mp4(tmp_path / "silent.mp4", frames)
  with pytest.raises(A.AudioReadError, match="silent.mp4: no audio stream"):
    A.load_waveform(str(tmp_path / "silent.mp4"))


def test_pre_text_is_official():
  assert T.pre_text("A Man (is) running--fast / <person> jumps!!  Now.") == \
      "a man is running fast person jumps now"
  assert T.pre_text("one two three four", max_words=2) == "one two"


def test_tokenizer_loads_real_vocab_and_avoids_the_fast_trap():
  from transformers import BertTokenizerFast
  vocab = T.default_tokenizer_dir() + "/vocab.txt"
  assert len(BertTokenizerFast(vocab_file=vocab)) < 100  # the trap this module avoids
  tok = T.load_tokenizer(vocab)
  assert len(tok) == 30522
  ids, mask = T.tokenize(T.load_tokenizer(), ["a red circle moves left", "x " * 100], 8)
  assert ids.shape == (2, 8) and ids[0, 0] == 101 and tok.unk_token_id not in ids[0]
  assert list(mask[0]) == [1] * 7 + [0] and ids[1, -1] == 102  # padded / truncated with [SEP]


def test_captions_are_sampled_uniformly():
  rng = np.random.default_rng(0)
  picks = [T.choose_caption(["a", "b", "c"], rng) for _ in range(3000)]
  counts = np.array([picks.count(c) for c in "abc"])
  assert (abs(counts - 1000) < 120).all()
  assert T.choose_caption(["a", "b"], None) == "a" and T.choose_caption("s", rng) == "s"
  with pytest.raises(ValueError, match="no usable caption"):
    T.choose_caption(["", "  "], rng)


def test_fbank_frames_and_too_short_audio_seconds():
  assert (A.fbank_frames(10), A.fbank_frames(2)) == (998, 198)
  with pytest.raises(ValueError, match="audio_seconds=0.05"):
    A.fbank_frames(0.05)
