import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, EDMEulerScheduler, UNet2DModel

from gendistill.models.networks import MLPNet, build_network
from gendistill.pipelines import MelVocoder, TeacherPipeline, load_pipeline, load_text_encoder


def small_teacher(shape=(1, 8, 8), classes=10):
    return TeacherPipeline(build_network(shape, num_classes=classes, channels=(8, 16)),
                           EDMEulerScheduler())


def test_teacher_pipeline_round_trip(tmp_path):
    pipe = small_teacher()
    pipe.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[3, 7], num_inference_steps=4, output_type="latent")
    a = pipe(generator=torch.Generator().manual_seed(0), **kw).samples
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_pipeline(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, TeacherPipeline)
    b = loaded(generator=torch.Generator().manual_seed(0), **kw).samples
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_output_types_and_label_check():
    pipe = small_teacher()
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[0, 1], num_inference_steps=2, output_type="np")
    assert out.samples.shape == (2, 8, 8, 1) and 0 <= out.samples.min() <= out.samples.max() <= 1
    assert out.conditions == [0, 1]
    pil = pipe(class_labels=0, num_inference_steps=1).samples
    assert pil[0].size == (8, 8)
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 9\], got \[10\]"):
        pipe(class_labels=[10])
    with pytest.raises(ValueError, match="pass class_labels"):
        pipe()


def test_mlp_network_saves_and_loads(tmp_path):
    net = MLPNet(in_dim=2, width=32, depth=2, num_class_embeds=5)
    net.save_pretrained(tmp_path)
    again = MLPNet.from_pretrained(tmp_path)
    x, t, y = torch.randn(4, 2), torch.rand(4), torch.tensor([0, 1, 2, 4])
    torch.testing.assert_close(net(x, t, y).sample, again(x, t, y).sample)


def test_diffusers_ddpm_folder_loads_as_teacher(tmp_path):
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(prediction_type="v_prediction")) \
        .save_pretrained(tmp_path)
    pipe = load_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.denoiser()).__name__ == "VPDenoiser"
    out = pipe(batch_size=3, num_inference_steps=3, output_type="latent").samples
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()


def test_vocoder_round_trip_keeps_the_spectrogram():
    voc = MelVocoder()
    t = torch.arange(voc.config.num_samples) / voc.config.sample_rate
    wave = (0.5 * torch.sin(2 * np.pi * 440 * t) * (torch.sin(2 * np.pi * 3 * t) > 0)).unsqueeze(0)
    mel = voc.encode(wave)
    assert mel.shape == (1, 1, 32, 32)
    rebuilt = voc(mel)
    assert rebuilt.shape == wave.shape

    def convergence(a, b):  # spectral convergence of mel magnitudes
        ma, mb = voc.mel_spectrogram(a), voc.mel_spectrogram(b)
        return ((ma - mb).norm() / ma.norm()).item()

    assert convergence(wave, rebuilt) < 0.25
    # and it is not trivially so: noise has a very different spectrogram
    assert convergence(wave, 0.1 * torch.randn_like(wave)) > 1.0


def test_text_encoder_offline():
    enc = load_text_encoder()
    states, pooled = enc(["a loud fast siren", "the sound of a fast loud siren",
                          "a quiet low tone", ""])
    assert states.shape == (4, 16, 384) and pooled.shape == (4, 384)
    sim = pooled @ pooled.T
    assert sim[0, 1] > sim[0, 2] + 0.1
    torch.testing.assert_close(enc([""])[0][0], states[3])


def test_sample_unconditional_gives_the_requested_count(tmp_path):
    from gendistill.generate import sample

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    pipe = TeacherPipeline(unet, DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    out = sample(pipe, num_per_condition=5, num_inference_steps=2)
    assert out.latents.shape == (5, 1, 8, 8)


def test_latents_and_sigmas_as_diffusers_pipelines_take_them():
    from gendistill.diffusion import append_zero, karras_sigmas
    from gendistill.models.student import CTMStudent
    from gendistill.pipelines import CTMPipeline, CTMScheduler

    teacher = small_teacher()
    student = CTMStudent.from_teacher(teacher.unet, 0.5, 0.002, embed_guidance=False)
    ctm = CTMPipeline(student, CTMScheduler())
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for pipe, steps, grid in ((teacher, 4, append_zero(karras_sigmas(4))),
                              (ctm, 2, karras_sigmas(3))):
        pipe.set_progress_bar_config(disable=True)
        kw = dict(class_labels=[3, 7], output_type="latent")
        drawn = pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                     **kw).samples
        # latents is the unit-variance noise the generator would have drawn
        torch.testing.assert_close(pipe(num_inference_steps=steps, latents=z, **kw).samples,
                                   drawn)
        # the default grid given as sigmas is the default run
        torch.testing.assert_close(pipe(sigmas=grid.tolist(), latents=z, **kw).samples, drawn)
        with pytest.raises(ValueError, match=r"latents: expected shape \(2, 1, 8, 8\)"):
            pipe(latents=torch.randn(3, 1, 8, 8), **kw)
        with pytest.raises(ValueError, match="strictly decreasing"):
            pipe(sigmas=[1.0, 5.0, 0.0], **kw)
    # a teacher's grid without its final 0 gets one
    torch.testing.assert_close(teacher(sigmas=karras_sigmas(4).tolist(), latents=z,
                                       class_labels=[3, 7], output_type="latent").samples,
                               teacher(sigmas=append_zero(karras_sigmas(4)), latents=z,
                                       class_labels=[3, 7], output_type="latent").samples)
    with pytest.raises(ValueError, match="up to sigma_max = 80.0"):
        ctm(sigmas=[100.0, 1.0], class_labels=[3, 7])
    with pytest.raises(ValueError, match="up to sigma_max = 80"):
        teacher(sigmas=[100.0, 1.0], class_labels=[3, 7])
