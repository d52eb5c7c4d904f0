"""SoundCTM text-to-sound: the audio pipeline as diffusers users know it, negative prompts,
training-free control (loudness envelope, spectral mask) and users' own audio folders."""
import csv
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
import torch

from gendistill.data import DataError, load_dataset
from gendistill.data.synthsounds import generate_synthsounds
from gendistill.models.networks import build_network
from gendistill.models.student import CTMStudent
from gendistill.pipelines import (CTMScheduler, LoudnessControl, MelVocoder, SoundCTMPipeline,
                                  SpectralMaskControl)
from gendistill.pipelines.control import band_mask, guide, to_db
from gendistill.pipelines.remote import save_with_remote_code
from gendistill.pipelines.text import MINILM


@pytest.fixture(scope="module")
def vocoder():
    return MelVocoder()


@pytest.fixture(scope="module")
def sound_pipe(vocoder):
    torch.manual_seed(0)
    net = build_network((1, 32, 32), cross_attention_dim=384, channels=(8, 16))
    student = CTMStudent.from_teacher(net, 0.5, 0.002, embed_guidance=True)
    pipe = SoundCTMPipeline(student, CTMScheduler(), vocoder=vocoder, text_encoder_name=MINILM)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def real_clips(vocoder):
    waves, captions, _ = generate_synthsounds(1, seed=0)
    waves = torch.from_numpy(waves[::6])  # 16 clips over every family
    return waves, vocoder.encode(waves)


def test_audio_output_as_diffusers_audio_pipelines(sound_pipe):
    calls = []
    hook = sound_pipe.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        out = sound_pipe("a loud fast siren", num_waveforms_per_prompt=2, generator=gen())
    finally:
        hook.remove()
    assert calls == [2]  # default: 1 step, the conditional branch only
    assert isinstance(out.audios, np.ndarray) and out.audios.shape == (2, 15872)
    assert out.sample_rate == 16000 and out.samples is out.audios and out.images is None
    explicit = sound_pipe("a loud fast siren", num_waveforms_per_prompt=2, generator=gen(),
                          num_inference_steps=1, guidance_scale=3.5, output_type="latent")
    torch.testing.assert_close(explicit.latents, out.latents)  # omega 3.5 is the default


def test_negative_prompt_is_what_nu_interpolates_from(sound_pipe):
    kw = dict(output_type="latent", num_inference_steps=1)
    cond = sound_pipe("a loud fast siren", generator=gen(), **kw).latents
    negative = sound_pipe("a quiet slow tone", generator=gen(), **kw).latents
    mixed = sound_pipe("a loud fast siren", negative_prompt="a quiet slow tone", nu=2.0,
                       generator=gen(), **kw).latents
    torch.testing.assert_close(mixed, negative + 2.0 * (cond - negative), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="nu-interpolation"):
        sound_pipe("a siren", negative_prompt="a tone")


def test_vocoding_is_deterministic_and_leaves_the_random_stream_alone(vocoder, real_clips):
    """Griffin-Lim's random initial phases come from a fixed seed: the same mel gives the same
    audio on every call (a seeded `generate` writes the same WAV), and the caller's stream does
    not move."""
    features = real_clips[1][:2]
    state = torch.random.get_rng_state()
    first = vocoder(features)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.rand(7)  # another global state: same audio
    assert torch.equal(vocoder(features), first)


def test_loudness_of_the_log_mels_is_the_loudness_of_the_vocoded_audio(vocoder, real_clips):
    waves, features = real_clips
    predicted = to_db(vocoder.frame_rms(vocoder.linear_magnitude(features)))
    measured = to_db(vocoder.loudness(vocoder(features)))
    assert (predicted - measured).abs().mean() < 0.5  # dB
    # Parseval: frame RMS from the STFT equals the windowed RMS of the frame itself
    n_fft, hop = vocoder.config.n_fft, vocoder.config.hop_length
    padded = torch.nn.functional.pad(waves[:1, None], (n_fft // 2, n_fft // 2),
                                     mode="reflect")[0, 0]
    window = torch.hann_window(n_fft)
    frame = padded[5 * hop:5 * hop + n_fft]
    direct = ((window * frame) ** 2).sum() / (window ** 2).sum()
    torch.testing.assert_close(vocoder.loudness(waves[:1])[0, 5], direct.sqrt(), rtol=1e-3,
                               atol=1e-6)


def test_control_errors_have_their_known_answers(vocoder, real_clips):
    waves, _ = real_clips
    own = LoudnessControl(target=vocoder.loudness(waves[:4]))
    err = own.error(waves[:4], vocoder)
    assert err["envelope_db_error"] < 1e-3 and err["envelope_corr"] > 0.999
    louder = LoudnessControl(target=2 * vocoder.loudness(waves[:4]))  # +6.02 dB everywhere
    assert abs(louder.error(waves[:4], vocoder)["envelope_db_error"] - 6.02) < 0.05
    # a log-mel with energy only in mel bins 8..15: none outside, all of it outside the rest
    features = -torch.ones(1, 1, 32, 32)
    features[..., 8:16, :] = 0.5
    band = band_mask(32, 32, 8, 16)
    inside = SpectralMaskControl(mask=band).loss(features, vocoder)
    outside = SpectralMaskControl(mask=band, keep="outside").loss(features, vocoder)
    assert inside.item() < 1e-6 and outside.item() > 1 - 1e-6
    with pytest.raises(ValueError, match="mask is"):
        SpectralMaskControl(mask=torch.ones(16, 32)).loss(features, vocoder)
    # a 440 Hz sine at amplitude 0.1 sits in the lower bins, at 20 log10(0.1 / sqrt 2) dB
    sine = 0.1 * torch.sin(2 * torch.pi * 440 * torch.arange(waves.shape[-1])
                           / vocoder.config.sample_rate)[None]
    sine_error = SpectralMaskControl(mask=band, keep="outside").error(sine, vocoder)
    assert abs(sine_error["level_db"] + 23.01) < 0.05
    low_half = band_mask(32, 32, 0, 16)
    assert SpectralMaskControl(mask=low_half).error(sine, vocoder)["energy_outside"] < 0.01
    # the bench's high-pass target: energy in the lower half of the bins is in the wrong place
    from gendistill.eval.bench import make_control
    highpass = make_control("highpass-guided", vocoder)
    assert highpass.method == "guided"
    assert highpass.loss(features, vocoder).item() > 1 - 1e-6  # all of it in bins 8..15
    features[..., 8:16, :], features[..., 20:28, :] = -1.0, 0.5
    assert highpass.loss(features, vocoder).item() < 1e-6
    with pytest.raises(ValueError, match="loudness target"):
        LoudnessControl(target=torch.ones(2, 3, 4))


def swell(frames=32):
    return 10 ** ((-40 + 28 * (1 - torch.linspace(-1, 1, frames).abs())) / 20)


def test_noise_optimisation_moves_the_output_towards_the_target(sound_pipe):
    prompts = ["a loud fast siren", "a quiet low tone"]
    control = LoudnessControl(target=swell(), method="noise", steps=15)
    free = sound_pipe(prompts, generator=gen(), output_type="latent").latents
    steered = sound_pipe(prompts, generator=gen(), control=control, output_type="latent").latents
    loss_free = control.loss(free, sound_pipe.vocoder).mean()
    loss_steered = control.loss(steered, sound_pipe.vocoder).mean()
    assert loss_steered < 0.5 * loss_free  # how far it gets is measured by the bench
    assert all(p.grad is None for p in sound_pipe.unet.parameters())  # weights untouched


def test_guided_sampling_edits_the_clean_estimate_between_jumps(sound_pipe):
    """Each jump but the last: g -> guide(g), the jump's output moved by (1 - s/t)(guide(g) - g);
    guide itself brings the estimate close to the target."""
    prompts = ["a loud fast siren", "a quiet low tone"]
    control = LoudnessControl(target=swell(), method="guided", steps=15)
    out = sound_pipe(prompts, num_inference_steps=2, generator=gen(), control=control,
                     output_type="latent").latents
    # the same by hand (gamma = 0: the jump lands on t_1, no renoising)
    pipe, scheduler = sound_pipe, sound_pipe.scheduler
    scheduler.set_timesteps(2, 0.0)
    cond = pipe.encode_prompt(prompts)
    x = pipe.initial_noise(2, scheduler.init_noise_sigma, gen())
    t, s = scheduler.jump(0)
    jumped, g = pipe.jump(x, t, s, cond, 3.5, 1.0, return_estimate=True)
    edited = guide(g, control, pipe.vocoder)
    assert control.loss(edited, pipe.vocoder).mean() < 0.1 * control.loss(g, pipe.vocoder).mean()
    t, s = scheduler.jump(1)
    expected = pipe.jump(jumped + (1 - s / t) * (edited - g), t, s, cond, 3.5, 1.0)
    # Adam's normalised steps turn float noise in near-zero gradients into small differences
    torch.testing.assert_close(out, expected, rtol=0, atol=0.02)
    assert (out - pipe.jump(jumped, t, s, cond, 3.5, 1.0)).abs().max() > 0.1  # the edit counts


def test_control_misuse_is_a_clear_error(sound_pipe):
    with pytest.raises(ValueError, match="num_inference_steps must be >= 2"):
        sound_pipe("a siren", control=LoudnessControl(target=swell(), method="guided"))
    with pytest.raises(ValueError, match="control method"):
        LoudnessControl(target=swell(), method="magic")


def run_python(code: str, cwd):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=cwd, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def gendistill(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "gendistill", *args], capture_output=True,
                          text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_saved_folder_loads_in_diffusers_and_the_cli_controls_it(sound_pipe, tmp_path):
    folder = tmp_path / "student"
    save_with_remote_code(sound_pipe, folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "SoundCTMPipeline"]
    expected = sound_pipe("a loud fast siren", generator=gen(3)).audios
    np.save(tmp_path / "expected.npy", expected)
    out = run_python(f"""
        import numpy as np, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
        out = pipe("a loud fast siren", generator=torch.Generator().manual_seed(3))
        assert out.sample_rate == 16000
        # Griffin-Lim starts from random phases: compare the spectrograms, not the samples
        mel = lambda w: pipe.vocoder.encode(torch.as_tensor(w))
        ref = np.load({str(tmp_path / 'expected.npy')!r})
        assert (mel(out.audios) - mel(ref)).abs().mean() < 0.05
        print(type(pipe).__name__)
    """, cwd=tmp_path)
    assert out.strip() == "SoundCTMPipeline"
    np.save(tmp_path / "swell.npy", swell(16).numpy())  # another length: resampled
    proc = gendistill("generate", str(folder), "--prompt", "a loud fast siren", "--num-samples",
                      "2", "--loudness", str(tmp_path / "swell.npy"), "--control-steps", "5",
                      "--out", str(tmp_path / "swell.wav"))
    assert "control: envelope_db_error" in proc.stdout
    assert (tmp_path / "swell-001.wav").is_file()
    proc = gendistill("generate", str(folder), "--prompt", "a siren", "--mask", "0:8",
                      "--mask-keep", "outside", "--control-method", "guided", "--steps", "2",
                      "--control-steps", "3", "--out", str(tmp_path / "masked.wav"))
    assert "control: energy_outside" in proc.stdout
    bad = gendistill("generate", str(folder), "--prompt", "a siren", "--mask", "40:50",
                     "--out", str(tmp_path / "x.wav"), check=False)
    assert bad.returncode == 2 and "--mask: mel bins 40:50 are outside 0:32" in bad.stderr
    (tmp_path / "text.npy").write_text("not numpy")
    bad = gendistill("generate", str(folder), "--prompt", "a siren", "--loudness",
                     str(tmp_path / "text.npy"), "--out", str(tmp_path / "x.wav"), check=False)
    assert bad.returncode == 2 and "--loudness: cannot read" in bad.stderr
    bad = gendistill("generate", str(folder), "--prompt", "a siren", "--negative-prompt", "x",
                     "--out", str(tmp_path / "x.wav"), check=False)
    assert bad.returncode == 2 and "nu-interpolation" in bad.stderr


def tone(rate, seconds=1.0, freq=440.0, channels=1):
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def write_folder(folder, rows, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, (wave, rate) in files.items():
        sf.write(folder / name, wave, rate)
    with (folder / "metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption"])
        writer.writerows(rows)


def test_audiofolder_reads_resamples_and_captions(tmp_path):
    files = {"a.wav": (tone(16000), 16000), "b.flac": (tone(48000, channels=2), 48000),
             "c.wav": (tone(22050, seconds=0.5, freq=880), 22050)}
    write_folder(tmp_path / "sounds", [("a.wav", "a tone"), ("b.flac", "the same tone, stereo"),
                                       ("c.wav", "a short high tone")], files)
    ds = load_dataset("audiofolder", path=str(tmp_path / "sounds"))
    assert ds.kind == "audio" and ds.x.shape == (3, 1, 32, 32)
    assert ds.captions == ["a tone", "the same tone, stereo", "a short high tone"]
    # the 48 kHz stereo file is the 16 kHz one after resampling (up to leakage far below the
    # tone): the same loudest mel bin in every frame, the same level where the energy is
    assert torch.equal(ds.x[0, 0].argmax(0), ds.x[1, 0].argmax(0))
    loud = ds.x[0] > 0
    assert (ds.x[0][loud] - ds.x[1][loud]).abs().mean() < 0.01
    # the half-second file is zero-padded: silence (the log floor) in its second half
    assert (ds.x[2, 0, :, 20:] == -1).all() and (ds.x[2, 0, :, :12] > -1).any()


@pytest.mark.parametrize("rows,files,message", [
    ([("a.wav", "")], {"a.wav": (tone(16000), 16000)}, "a.wav has no caption"),
    ([("gone.wav", "x")], {}, "gone.wav: file not found"),
    ([("a.wav", "x")], {"a.wav": (tone(8000), 8000)}, "sample rate 8000 Hz is below"),
    ([("a.mp3", "x")], {}, "not a WAV or FLAC file"),
])
def test_audiofolder_errors_name_the_file(tmp_path, rows, files, message):
    write_folder(tmp_path / "sounds", rows, files)
    with pytest.raises(DataError, match=message):
        load_dataset("audiofolder", path=str(tmp_path / "sounds"))


def test_audiofolder_unreadable_file_and_bad_metadata(tmp_path):
    folder = tmp_path / "sounds"
    write_folder(folder, [("a.wav", "x")], {})
    (folder / "a.wav").write_text("not audio")
    with pytest.raises(DataError, match="a.wav: cannot read audio"):
        load_dataset("audiofolder", path=str(folder))
    (folder / "metadata.csv").write_text("name,text\na.wav,x\n")
    with pytest.raises(DataError, match="missing column"):
        load_dataset("audiofolder", path=str(folder))


def test_train_a_teacher_on_an_audiofolder(tmp_path):
    rows = [(f"{i}.wav", f"a tone at {f} hertz") for i, f in enumerate((220, 440, 880, 660))]
    files = {name: (tone(16000, freq=f), 16000) for (name, _), f in zip(rows, (220, 440, 880, 660))}
    write_folder(tmp_path / "sounds", rows, files)
    gendistill("train", "configs/teacher/synthsounds.yaml", "data.name=audiofolder",
               f"data.path={tmp_path / 'sounds'}", f"output_dir={tmp_path / 'run'}",
               "train.max_steps=2", "train.batch_size=4", "network.channels=[8,16]")
    index = json.loads((tmp_path / "run" / "model" / "model_index.json").read_text())
    assert index["vocoder"][1] == "MelVocoder" and index["text_encoder_name"] == MINILM


def test_shipped_soundctm_student_and_the_demo_sounds(tmp_path):
    """The shipped text-to-sound student: one call per sound, the captioned family (the bench:
    96.9 % at omega 3.5, the teacher 100 %), and the demo's WAVs and sheet."""
    from gendistill.assets import builtin_student
    from gendistill.demo import DEMO_PROMPTS, text_to_sound
    from gendistill.eval.accuracy import caption_families, conditional_accuracy
    from gendistill.pipelines import load_pipeline

    student = load_pipeline(builtin_student("synthsounds"))
    student.set_progress_bar_config(disable=True)
    assert isinstance(student, SoundCTMPipeline) and student.unet.has_guidance
    captions = load_dataset("synthsounds", "test").captions[::8]
    out = student(captions, generator=gen(), output_type="latent")
    assert conditional_accuracy(out.latents, caption_families(captions), "synthsounds") > 0.9
    text_to_sound(tmp_path)
    assert len(list((tmp_path / "text_to_sound" / "student").glob("*.wav"))) == len(DEMO_PROMPTS)
    assert (tmp_path / "text_to_sound" / "teacher_vs_soundctm.png").stat().st_size > 5000


def test_bench_reads_a_control_against_the_same_call_without_it(sound_pipe):
    from gendistill.eval.bench import Row, control_errors, make_control
    from gendistill.generate import sample

    prompts = ["a loud fast siren", "a quiet low beep"]
    row = Row("guided", "soundctm", "ctm", {"num_inference_steps": 3, "gamma": 1.0},
              "loudness-guided")
    control = make_control(row.control, sound_pipe.vocoder)
    errors = control_errors(sound_pipe, prompts, row, control)
    assert errors["uncontrolled"]["network_calls_per_sample"] == 3  # the row's own 3 jumps
    plain = sample(sound_pipe, None, prompts, 1, 0, **row.call)
    expected = control.error(sound_pipe.vocoder(plain.latents), sound_pipe.vocoder)
    for key, value in expected.items():  # Griffin-Lim's random phases move them a little
        assert errors["uncontrolled"][key] == pytest.approx(value, rel=0.05)
