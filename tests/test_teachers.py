"""Any teacher: every parameterisation trains a teacher that learns, saves as a diffusers folder,
and a CTM student of it is exactly that teacher at step 0.

Gaussian data x0 ~ N(0, C^2 I) has the optimal denoiser C^2 / (C^2 + sigma^2) x_sigma: a teacher
trained with the right target in its parameterisation gets close to it; a wrong target (epsilon
for v, say) cannot.
"""
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from diffusers import (DDIMPipeline, DDIMScheduler, DDPMScheduler, EDMEulerScheduler,
                       FlowMatchEulerDiscreteScheduler, UNet2DModel)

from gendistill.config import Config, build, validate
from gendistill.diffusion import (EDMDenoiser, FlowDenoiser, VPDenoiser, denoiser_from_scheduler,
                                  scheduler_config)
from gendistill.models.msd import MSDStudents
from gendistill.models.networks import build_network
from gendistill.models.student import CTMStudent
from gendistill.partition import Router, contiguous_partition
from gendistill.pipelines import CTMPipeline, CTMScheduler, MSDPipeline, TeacherPipeline
from gendistill.train import run_training

C = 0.5
PARAMETERIZATIONS = {"edm": EDMDenoiser, "vp-eps": VPDenoiser, "vp-v": VPDenoiser,
                     "flow": FlowDenoiser}
SCHEDULERS = {
    "edm": lambda: EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5),
    "vp-eps": lambda: DDPMScheduler(prediction_type="epsilon"),
    "vp-v": lambda: DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction"),
    "vp-x0": lambda: DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample"),
    "flow": lambda: FlowMatchEulerDiscreteScheduler(),
}


def same(a, b, sigma):
    """Equal to 1e-5, in units of the noise level above sigma = 1: a VP teacher's
    x0 = x - sigma * eps at sigma_max = 157 sums terms in the hundreds, which float32 (and a
    multi-threaded conv's summation order) rounds at about 157 x 1e-7 per operation."""
    scale = torch.as_tensor(sigma, dtype=a.dtype).clamp_min(1.0).expand(a.shape[0])
    assert ((a - b).abs().flatten(1).max(1).values / scale).max() <= 1e-5


def student_of(teacher, scheduler, net, embed_guidance=True):
    return CTMStudent.from_teacher(net, teacher.sigma_data, teacher.sigma_min, embed_guidance,
                                   teacher_scheduler=scheduler_config(scheduler))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_msd_students_keep_their_teachers_parameterization(name, tmp_path):
    scheduler = SCHEDULERS[name]()
    net = build_network((1, 8, 8), num_classes=4, channels=(8, 16))
    teacher = denoiser_from_scheduler(net, scheduler)
    router = Router.for_classes(contiguous_partition(4, 2))
    students = MSDStudents.from_networks([net, net], router, teacher)
    students.save_pretrained(tmp_path)
    students = MSDStudents.from_pretrained(tmp_path)
    assert type(students.denoiser(1)) is type(teacher)
    noise, y = teacher.sigma_max * torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():  # a student that is a copy of the teacher: D(sigma_max z, sigma_max)
        expected = teacher(noise, torch.tensor(teacher.sigma_max), y)
        same(students(noise, y, router(y)), expected, teacher.sigma_max)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_student_is_its_teacher_at_step_zero(name, tmp_path):
    scheduler = SCHEDULERS[name]()
    net = build_network((1, 8, 8), num_classes=10, channels=(8, 16))
    teacher = denoiser_from_scheduler(net, scheduler)
    student = student_of(teacher, scheduler, net)
    assert type(student.parameterization) is type(teacher)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 5, 9])
    t = torch.tensor([teacher.sigma_max, 5.0, 1.0, 0.1])
    with torch.no_grad():
        expected = teacher(x, t, y)
        for s in (0.0, 0.05):
            g = student(x, t, torch.full_like(t, s), y, 3.0, return_denoised=True)
            same(g, expected, t)
        same(student(x, t, 0.0, y, 2.0), expected, t)  # G(x, t, 0) = D
        # the parameterisation travels with the saved student
        student.save_pretrained(tmp_path)
        loaded = CTMStudent.from_pretrained(tmp_path)
        assert type(loaded.parameterization) is type(teacher)
        same(loaded(x, t, 0.0, y, 2.0), expected, t)


def test_ema_copy_keeps_its_own_parameterization():
    import copy

    scheduler = SCHEDULERS["vp-eps"]()
    net = build_network((2,), width=16, depth=2)
    student = student_of(denoiser_from_scheduler(net, scheduler), scheduler, net, False)
    x, t = torch.randn(3, 2), torch.tensor([1.0, 2.0, 3.0])
    student(x, t, t / 2)  # builds (and caches) the adapter
    twin = copy.deepcopy(student)
    assert twin.parameterization.net is twin.network
    with torch.no_grad():
        for p in twin.network.parameters():
            p.add_(1.0)
    assert not torch.allclose(twin(x, t, t / 2), student(x, t, t / 2))


@pytest.fixture(scope="module")
def gaussian_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("gauss") / "gauss.npz"
    x = C * np.random.default_rng(0).standard_normal((4096, 2)).astype(np.float32)
    np.savez(path, x=x)
    return path


def gaussian_teacher(parameterization, npz, out, steps=400):
    cfg = validate(build(Config, dict(
        method="teacher", output_dir=str(out), data=dict(name="npz", path=str(npz)),
        network=dict(width=64, depth=2), diffusion=dict(parameterization=parameterization),
        train=dict(max_steps=steps, batch_size=256, lr=2e-3, warmup_steps=20, ema_decay=0.99,
                   checkpoint_every=0, log_every=1000, threads=1))))
    return run_training(cfg)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
def test_teacher_of_every_parameterization_learns_the_optimal_denoiser(parameterization, tmp_path,
                                                                         gaussian_npz):
    folder = gaussian_teacher(parameterization, gaussian_npz, tmp_path / "run")
    pipe = TeacherPipeline.from_pretrained(folder)
    expected_scheduler = {"edm": "EDMEulerScheduler", "vp-eps": "DDPMScheduler",
                          "vp-v": "DDPMScheduler", "flow": "FlowMatchEulerDiscreteScheduler"}
    assert type(pipe.scheduler).__name__ == expected_scheduler[parameterization]
    teacher = pipe.denoiser()
    assert type(teacher) is PARAMETERIZATIONS[parameterization]
    torch.manual_seed(1)
    for sigma in (0.1, 0.3, 1.0):
        x = C * torch.randn(4096, 2) + sigma * torch.randn(4096, 2)
        optimal = C ** 2 / (C ** 2 + sigma ** 2) * x
        with torch.no_grad():
            err = ((teacher(x, torch.tensor(sigma)) - optimal) ** 2).mean() / (optimal ** 2).mean()
        # 400 steps bring every parameterisation within a few % here; the target of another
        # parameterisation is off by about 100 %
        assert err < 0.05, (parameterization, sigma, float(err))


def test_ctm_student_of_a_flow_teacher_trains_saves_and_generates(tmp_path, gaussian_npz):
    teacher_folder = gaussian_teacher("flow", gaussian_npz, tmp_path / "teacher", steps=50)
    cfg = validate(build(Config, dict(
        method="ctm", output_dir=str(tmp_path / "ctm"), teacher=str(teacher_folder),
        data=dict(name="npz", path=str(gaussian_npz)), ctm=dict(num_grid=6),
        train=dict(max_steps=3, batch_size=16, checkpoint_every=0, threads=1))))
    pipe = CTMPipeline.from_pretrained(run_training(cfg))
    assert type(pipe.unet.parameterization) is FlowDenoiser
    assert pipe.unet.config.teacher_scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    out = pipe(batch_size=8, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.samples.shape == (8, 2) and np.isfinite(out.samples).all()


def test_msd_of_a_vp_teacher_trains_assembles_and_generates(tmp_path):
    teacher_cfg = validate(build(Config, dict(
        method="teacher", output_dir=str(tmp_path / "teacher"), data=dict(name="toy2d"),
        network=dict(width=32, depth=2), diffusion=dict(parameterization="vp-v"),
        train=dict(max_steps=20, batch_size=64, checkpoint_every=0, threads=1))))
    teacher_folder = run_training(teacher_cfg)
    cfg = validate(build(Config, dict(
        method="msd", output_dir=str(tmp_path / "msd"), teacher=str(teacher_folder),
        data=dict(name="toy2d"), msd=dict(num_students=2, num_pairs=16, pair_steps=3,
                                          student_width=0.5, tsm_steps=2),
        train=dict(max_steps=6, batch_size=16, checkpoint_every=0, threads=1))))
    pipe = MSDPipeline.from_pretrained(run_training(cfg))
    assert type(pipe.students.denoiser(0)) is VPDenoiser
    out = pipe(class_labels=[0, 3], output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.samples.shape == (2, 2) and np.isfinite(out.samples).all()
    assert out.students == [0, 1]


def test_vp_teacher_folder_is_sampled_by_diffusers_own_pipeline(tmp_path):
    images = np.random.default_rng(0).uniform(-1, 1, (64, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "images.npz", x=images)
    cfg = validate(build(Config, dict(
        method="teacher", output_dir=str(tmp_path / "run"),
        data=dict(name="npz", path=str(tmp_path / "images.npz"), kind="image"),
        network=dict(channels=[8, 16]), diffusion=dict(parameterization="vp-v"),
        train=dict(max_steps=2, batch_size=8, checkpoint_every=0, threads=1))))
    folder = run_training(cfg)
    unet = UNet2DModel.from_pretrained(folder / "unet")
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    out = DDIMPipeline(unet=unet, scheduler=scheduler)(
        batch_size=2, num_inference_steps=3, output_type="np",
        generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 8, 8, 1) and np.isfinite(out).all()


def transformer(kind):
    if kind == "dit":
        return build_network((1, 8, 8), num_classes=10, network_type="dit", width=32, depth=3,
                             heads=2)
    return build_network((1, 8, 8), cross_attention_dim=24, network_type="dit", width=32,
                         depth=3, heads=2)


@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_transformer_student_is_its_teacher_at_step_zero(kind):
    from gendistill.diffusion import feature_modules

    net = transformer(kind).eval()  # a teacher is used in eval mode
    scheduler = SCHEDULERS["vp-v"]()
    teacher = denoiser_from_scheduler(net, scheduler)
    student = student_of(teacher, scheduler, net).eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([10.0, 1.0, 0.1])
    cond = torch.tensor([0, 4, 9]) if kind == "dit" else torch.randn(3, 5, 24)
    with torch.no_grad():
        expected = teacher(x, t, cond)
        same(student(x, t, 0.0, cond, 3.0), expected, t)
        # once trained, s reaches every block through the timestep embedding
        for p in student.s_embedding.linear_2.parameters():
            p.normal_()
        moved = student(x, t, torch.full_like(t, 0.05), cond, return_denoised=True)
        assert (moved - expected).abs().max() > 1e-3
    # the SoundCTM distance taps each transformer block, fed the previous block's output
    assert feature_modules(net) == list(net.transformer_blocks)
    assert len(teacher.features(x, t, cond)) == 3


def test_students_never_drop_dit_labels_themselves():
    from gendistill.models.networks import without_label_dropout

    scheduler = SCHEDULERS["edm"]()
    net = transformer("dit")
    student = student_of(denoiser_from_scheduler(net, scheduler), scheduler, net).train()
    x, t, y = torch.randn(64, 1, 8, 8), torch.full((64,), 1.0), torch.arange(64) % 10
    with torch.no_grad():
        # diffusers' DiT replaces 10 % of the labels by the null class in training mode
        assert not torch.equal(student(x, t, 0.5, y), student(x, t, 0.5, y))
        without_label_dropout(student)
        assert torch.equal(student(x, t, 0.5, y), student.eval()(x, t, 0.5, y))


@pytest.mark.slow
def test_dit_teacher_and_its_ctm_student_through_the_cli(tmp_path):
    from test_cli import run  # the gendistill command in a subprocess, as a user runs it

    dit = ["network.type=dit", "network.width=32", "network.depth=2", "network.heads=2"]
    run("train", "configs/teacher/digits-vp.yaml", f"output_dir={tmp_path / 'teacher'}", *dit,
        "train.max_steps=3", "train.batch_size=8", "train.checkpoint_every=0")
    teacher = TeacherPipeline.from_pretrained(tmp_path / "teacher" / "model")
    assert type(teacher.unet).__name__ == "DiTTransformer2DModel"
    run("train", "configs/ctm/digits.yaml", f"output_dir={tmp_path / 'ctm'}",
        f"teacher={tmp_path / 'teacher' / 'model'}", "ctm.num_grid=4", "train.max_steps=2",
        "train.batch_size=4", "train.checkpoint_every=0")
    proc = run("generate", str(tmp_path / "ctm" / "model"), "--class", "7", "--num-samples", "2",
               "--out", str(tmp_path / "seven.png"))
    assert (tmp_path / "seven.png").stat().st_size > 100, proc.stdout
    pipe = CTMPipeline.from_pretrained(tmp_path / "ctm" / "model")
    assert type(pipe.unet.parameterization) is VPDenoiser


def tiny_latent_mel_teacher(folder):
    """A latent text-to-mel teacher, randomly initialised real diffusers components: a
    VAE over the 1 x 32 x 32 mel spectrogram (4 x 16 x 16 latents), a text UNet on the latents,
    a VP epsilon scheduler, the vocoder and the text encoder by name."""
    from diffusers import AutoencoderKL

    from gendistill.data import load_dataset
    from gendistill.pipelines import MelVocoder
    from gendistill.pipelines.text import MINILM

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        layers_per_block=1, norm_num_groups=4, sample_size=32)
    unet = build_network((4, 16, 16), cross_attention_dim=384, channels=(8, 16))
    vocoder = MelVocoder.from_config(load_dataset("synthsounds", "test").vocoder)
    TeacherPipeline(unet, DDPMScheduler(), vocoder, text_encoder_name=MINILM,
                    vae=vae).save_pretrained(folder)
    return vae


@pytest.mark.slow
def test_latent_teacher_is_distilled_in_latent_space_and_decoded_by_its_vae(tmp_path):
    from test_cli import run

    vae = tiny_latent_mel_teacher(tmp_path / "teacher")
    teacher = TeacherPipeline.from_pretrained(tmp_path / "teacher")
    out = teacher(prompt="a quiet low hum", num_inference_steps=2, output_type="latent")
    assert out.samples.shape == (1, 4, 16, 16)                        # diffusers' meaning
    assert out.latents.shape == (1, 1, 32, 32)                        # decoded mel
    torch.testing.assert_close(out.latents, teacher.decode(out.vae_latents))
    run("train", "configs/ctm/synthsounds.yaml", f"output_dir={tmp_path / 'ctm'}",
        f"teacher={tmp_path / 'teacher'}", "ctm.num_grid=4", "ctm.max_jump=2",
        "train.max_steps=2", "train.batch_size=4", "train.checkpoint_every=0")
    student = CTMPipeline.from_pretrained(tmp_path / "ctm" / "model")
    assert type(student.unet.parameterization) is VPDenoiser
    for name, weight in vae.state_dict().items():                     # the teacher's own VAE
        torch.testing.assert_close(student.vae.state_dict()[name], weight)
    run("generate", str(tmp_path / "ctm" / "model"), "--prompt", "a loud high beep",
        "--num-samples", "1", "--out", str(tmp_path / "beep.wav"))
    import soundfile as sf

    wave, rate = sf.read(tmp_path / "beep.wav")
    assert rate == student.vocoder.config.sample_rate
    assert len(wave) == student.vocoder.config.num_samples and np.isfinite(wave).all()
    # a classifier's features judge images: a latent teacher's samples are latents
    from gendistill.config import ConfigError, load_config
    from gendistill.methods.ctm import CTMTraining

    cfg = load_config("configs/ctm/synthsounds.yaml", [
        f"teacher={tmp_path / 'teacher'}", "ctm.num_grid=4", "ctm.max_jump=2",
        "ctm.gan_weight=0.1", f"ctm.gan_classifier={tmp_path / 'classifier'}"])
    with pytest.raises(ConfigError, match="would judge the latent teacher's latents"):
        CTMTraining(cfg, teacher, teacher.null_condition())


def tiny_stable_diffusion(folder, cross_attention_dim: int = 32):
    """A Stable-Diffusion-shaped text-to-mel teacher saved by diffusers' own
    StableDiffusionPipeline, randomly initialised: a CLIP text encoder and tokenizer (a
    character vocabulary), a VAE over the synthsounds mel (4 x 16 x 16 latents), a text UNet
    reading CLIP's 32-wide states, a VP epsilon scheduler."""
    import string

    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[],
                              model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
        pad_token_id=1))
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        layers_per_block=1, norm_num_groups=4, sample_size=32)
    unet = build_network((4, 16, 16), cross_attention_dim=cross_attention_dim, channels=(8, 16))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=DDPMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return pipe


@pytest.mark.slow
def test_a_latent_teachers_own_clip_encoder_conditions_its_ctm_and_msd_students(tmp_path):
    from test_cli import run

    from gendistill.pipelines import load_pipeline

    sd = tiny_stable_diffusion(tmp_path / "sd")
    teacher = load_pipeline(tmp_path / "sd")
    assert teacher.conditioning == "text"
    prompts = ["a loud high beep", ""]
    expected = sd.encode_prompt(prompts, "cpu", 1, False)[0]  # diffusers' own convention
    assert expected.shape == (2, 77, 32)
    torch.testing.assert_close(teacher.encode_prompt(prompts), expected, rtol=0, atol=0)
    tiny = ("train.max_steps=2", "train.batch_size=4", "train.checkpoint_every=0")
    run("train", "configs/ctm/synthsounds.yaml", f"output_dir={tmp_path / 'ctm'}",
        f"teacher={tmp_path / 'sd'}", "ctm.num_grid=4", "ctm.max_jump=2", *tiny)
    student = CTMPipeline.from_pretrained(tmp_path / "ctm" / "model")
    assert type(student.text_encoder).__name__ == "CLIPTextModel"      # carried with the student
    torch.testing.assert_close(student.encode_prompt(prompts), expected, rtol=0, atol=0)
    assert student(prompt="a quiet hum", output_type="latent").samples.shape == (1, 4, 16, 16)
    run("generate", str(tmp_path / "ctm"), "--prompt", "a loud high beep", "--num-samples", "1",
        "--out", str(tmp_path / "beep.png"))
    assert (tmp_path / "beep.png").stat().st_size > 100
    # MSD: the prompts are split by the teacher's own pooled CLIP states (32 wide, not MiniLM's);
    # the students learn the VAE's latents: teacher pairs, TSM of narrow students and the
    # adversarial head's real samples (encoded) all live there
    run("train", "configs/msd/synthsounds.yaml", f"output_dir={tmp_path / 'msd'}",
        f"teacher={tmp_path / 'sd'}", "msd.num_students=2", "msd.num_pairs=4",
        "msd.pair_steps=2", "msd.student_width=0.5", "msd.tsm_steps=1", "msd.adversarial=true",
        "msd.gan_start=1", "msd.gen_update_ratio=1", "train.max_steps=3", *tiny[1:])
    router = json.loads((tmp_path / "msd" / "partition.json").read_text())
    assert len(router["axes"][0]) == 32
    pairs = torch.load(tmp_path / "msd" / "teacher_pairs.pt", weights_only=True)
    assert pairs["x"].shape == pairs["noise"].shape == (4, 4, 16, 16)
    msd = MSDPipeline.from_pretrained(tmp_path / "msd" / "model")
    torch.testing.assert_close(msd.encode_prompt(prompts), expected, rtol=0, atol=0)
    for name, weight in sd.vae.state_dict().items():                   # the teacher's own VAE
        torch.testing.assert_close(msd.vae.state_dict()[name], weight)
    out = msd(prompt=["a loud high beep", "a quiet low hum", "fast beeps", "a slow siren"] * 4,
              output_type="latent")
    assert sorted(set(out.students)) == [0, 1]
    assert out.samples.shape == (16, 4, 16, 16) and out.latents.shape == (16, 1, 32, 32)
    torch.testing.assert_close(out.latents, msd.decode(out.samples))


def tiny_audioldm(folder, mel_bins: int = 16):
    """An AudioLDM-shaped text-to-sound teacher saved by diffusers' own AudioLDMPipeline,
    randomly initialised: a CLAP text encoder with projection and a RoBERTa tokenizer (a
    character vocabulary), a VAE over (1, 32 frames, 16 mel bins) log-mels, a UNet that reads
    CLAP's projected embedding through its class embedding (concatenated to the time
    embedding, no cross-attention states), a DDIM scheduler and a SpeechT5 HiFi-GAN with
    AudioLDM's hop of 160 samples."""
    import string

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.deprecated.audioldm.pipeline_audioldm import AudioLDMPipeline
    from transformers import (ClapTextConfig, ClapTextModelWithProjection, RobertaTokenizer,
                              SpeechT5HifiGan, SpeechT5HifiGanConfig)

    tokens = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "\u0120", *string.ascii_lowercase]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = RobertaTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                 model_max_length=77)
    torch.manual_seed(0)
    text_encoder = ClapTextModelWithProjection(ClapTextConfig(
        vocab_size=len(tokens), hidden_size=16, projection_dim=8, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=90,
        pad_token_id=1)).eval()  # as from_pretrained gives it: CLAP has dropout
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        layers_per_block=1, norm_num_groups=4, sample_size=32)
    unet = UNet2DConditionModel(
        sample_size=(16, mel_bins // 2), in_channels=4, out_channels=4,
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=(8, 16),
        class_embed_type="simple_projection", projection_class_embeddings_input_dim=8,
        class_embeddings_concat=True)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=16, upsample_initial_channel=16, upsample_rates=[8, 5, 4],
        upsample_kernel_sizes=[16, 10, 8], resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]], normalize_before=False))
    pipe = AudioLDMPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=DDIMScheduler(), vocoder=vocoder)
    pipe.save_pretrained(folder / "audioldm")
    return pipe


def test_audioldm_vocoder_keeps_its_hifigan_and_makes_its_log_mels(tmp_path):
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    from gendistill.pipelines import HifiGanVocoder

    torch.manual_seed(0)
    hifigan = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=16, upsample_initial_channel=16, upsample_rates=[8, 5, 4],
        upsample_kernel_sizes=[16, 10, 8], resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]], normalize_before=False))
    vocoder = HifiGanVocoder.wrap(hifigan, num_frames=32)
    assert (vocoder.hop_length, vocoder.num_frames, vocoder.config.num_samples) == (160, 32, 5120)
    mel = torch.randn(2, 1, 32, 16)
    with torch.no_grad():
        # cut to the clip, as AudioLDM's pipeline cuts (the transposed convolutions add a few)
        torch.testing.assert_close(vocoder(mel), hifigan(mel.squeeze(1))[:, :5120], rtol=0,
                                   atol=0)
    vocoder.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(HifiGanVocoder.from_pretrained(tmp_path)(mel), vocoder(mel))
    # a 2 kHz tone, at any level: the log-mel frames (time down, mel bins across) peak in the
    # bin whose Slaney filter is centred nearest 2 kHz, and the level is normalised away
    t = torch.arange(5120) / 16000
    tone = torch.sin(2 * torch.pi * 2000 * t)
    features = vocoder.encode(torch.stack([tone, 0.01 * tone]))
    assert features.shape == (2, 1, 32, 16)
    centres = vocoder.filters.argmax(0).float() * 8000 / (vocoder.filters.shape[0] - 1)
    assert (features[0, 0].argmax(1) == (centres - 2000).abs().argmin()).all()
    torch.testing.assert_close(features[0], features[1], rtol=0, atol=5e-3)


@pytest.mark.slow
def test_an_audioldm_teacher_is_distilled_with_its_clap_embedding_and_vocoder(tmp_path):
    from test_cli import run
    from test_soundctm import tone, write_folder

    from gendistill.pipelines import HifiGanVocoder, SoundCTMPipeline, load_pipeline

    audioldm = tiny_audioldm(tmp_path)
    teacher = load_pipeline(tmp_path / "audioldm")
    assert teacher.conditioning == "text" and isinstance(teacher.vocoder, HifiGanVocoder)
    prompts = ["a loud high beep", ""]
    expected = audioldm._encode_prompt(prompts, "cpu", 1, False)  # diffusers' own convention
    assert expected.shape == (2, 8)                  # CLAP's projected, normalised embedding
    torch.testing.assert_close(teacher.encode_prompt(prompts), expected, rtol=0, atol=0)
    # the teacher's network call is AudioLDM's: the embedding as class labels, no text states
    x, t = torch.randn(2, 4, 16, 8), torch.tensor([999, 500])
    with torch.no_grad():
        eps = audioldm.unet(x, t, encoder_hidden_states=None, class_labels=expected).sample
        scheduler = audioldm.scheduler
        alpha = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        sigma = ((1 - alpha) / alpha).sqrt()                 # x_sigma = x_t / sqrt(alpha)
        x0 = teacher.denoiser()(x / alpha.sqrt(), sigma.flatten(), expected)
    same(x0, x / alpha.sqrt() - sigma * eps, sigma.flatten())
    # a CTM student of it (s / omega embeddings beside the concatenated class embedding) is it
    denoiser = teacher.denoiser()
    student = student_of(denoiser, teacher.scheduler, teacher.unet)
    with torch.no_grad():
        same(student(x / alpha.sqrt(), sigma.flatten(), 0.0, expected, 3.0), x0,
             sigma.flatten())
    # its student learns from a folder of the user's audio, made into AudioLDM's log-mels
    rate = 16000
    files = {f"{n}.wav": (tone(rate, seconds=0.32, freq=f), rate)
             for n, f in (("beep", 2000), ("hum", 200), ("mid", 800), ("high", 4000))}
    write_folder(tmp_path / "sounds", [(n, f"a {n[:-4]}") for n in files], files)
    args = ("train", "configs/ctm/synthsounds.yaml", f"output_dir={tmp_path / 'ctm'}",
            f"teacher={tmp_path / 'audioldm'}", "data.name=audiofolder",
            f"data.path={tmp_path / 'sounds'}", "ctm.num_grid=4", "ctm.max_jump=2",
            "train.max_steps=2", "train.batch_size=4", "train.checkpoint_every=0")
    # the sound config reads omega through the text token states, which AudioLDM's UNet has
    # not (its text is a class embedding): one line says so and what to set (after diffusers'
    # own deprecation notice of AudioLDMPipeline)
    refused = run(*args, check=False)
    errors = [line for line in refused.stderr.splitlines() if "error" in line]
    assert refused.returncode == 2 and len(errors) == 1 and "Traceback" not in refused.stderr
    assert errors[0].startswith("gendistill train: error: ctm.guidance_in_text needs")
    assert errors[0].endswith("set ctm.guidance_in_text=false")
    assert not (tmp_path / "ctm" / "model").exists()
    run(*args, "ctm.guidance_in_text=false")
    student = SoundCTMPipeline.from_pretrained(tmp_path / "ctm" / "model")
    assert isinstance(student.vocoder, HifiGanVocoder)
    torch.testing.assert_close(student.encode_prompt(prompts), expected, rtol=0, atol=0)
    run("generate", str(tmp_path / "ctm"), "--prompt", "a beep", "--num-samples", "1",
        "--out", str(tmp_path / "beep.wav"))
    wave, rate = sf.read(tmp_path / "beep.wav")
    assert rate == 16000 and len(wave) == 5120 and np.isfinite(wave).all()
    bad = run("generate", str(tmp_path / "ctm"), "--prompt", "a beep", "--mask", "0:4",
              "--out", str(tmp_path / "masked.wav"), check=False)
    assert bad.returncode == 2 and "samples are VAE latents" in bad.stderr, bad.stderr


def test_a_foreign_teacher_whose_text_encoder_does_not_fit_is_refused_by_name(tmp_path):
    from gendistill.pipelines import load_pipeline

    tiny_stable_diffusion(tmp_path / "sd", cross_attention_dim=48)  # CLIP gives 32
    with pytest.raises(ValueError, match=r"StableDiffusionPipeline's text encoder "
                       r"\(CLIPTextModel\) gives 32-wide states, its network's cross-attention "
                       r"reads 48"):
        load_pipeline(tmp_path / "sd")


def test_an_audioldm_teacher_whose_vocoder_does_not_fit_is_refused_by_name(tmp_path):
    from gendistill.pipelines import load_pipeline

    tiny_audioldm(tmp_path, mel_bins=8)  # its samples have 8 mel bins, its HiFi-GAN reads 16
    with pytest.raises(ValueError, match=r"AudioLDMPipeline's samples have 8 mel bins, its "
                       r"vocoder \(SpeechT5HifiGan\) reads 16"):
        load_pipeline(tmp_path / "audioldm")


def test_unsupported_scheduler_or_network_is_a_one_line_error(tmp_path):
    from diffusers import CMStochasticIterativeScheduler, UNet1DModel
    from test_cli import run

    net = build_network((1, 8, 8), num_classes=10, channels=(8, 16))
    TeacherPipeline(net, CMStochasticIterativeScheduler()).save_pretrained(tmp_path / "cm")
    TeacherPipeline(UNet1DModel(), DDPMScheduler()).save_pretrained(tmp_path / "unet1d")
    for folder, message in (("cm", "no teacher adapter for scheduler "
                                   "CMStochasticIterativeScheduler; supported: EDM"),
                            ("unet1d", "has a UNet1DModel network; supported: UNet2DModel")):
        proc = run("train", "configs/ctm/digits.yaml", f"teacher={tmp_path / folder}",
                   f"output_dir={tmp_path / 'out'}", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_narrow_students_of_text_unets_and_transformers():
    from gendistill.methods.dmd2 import narrow_network

    text = build_network((1, 8, 8), cross_attention_dim=32, channels=(8, 16))
    assert list(narrow_network(text, 0.5).config.block_out_channels) == [8, 8]
    for kind in ("dit", "pixart"):
        narrow = narrow_network(transformer(kind), 0.5)
        assert narrow.config.num_attention_heads == 1 and narrow.inner_dim == 16
        cond = torch.tensor([1, 2]) if kind == "dit" else torch.randn(2, 5, 24)
        key = "class_labels" if kind == "dit" else "encoder_hidden_states"
        assert narrow(torch.randn(2, 1, 8, 8), timestep=torch.ones(2),
                      **{key: cond}).sample.shape == (2, 1, 8, 8)


def test_transformer_features_are_normalised_per_token_and_judged_by_token_heads():
    from gendistill.methods.ctm import normalized_feature_distance
    from gendistill.models.discriminator import FeatureDiscriminator

    teacher = EDMDenoiser(transformer("dit").eval())
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        feats = teacher.features(x, torch.ones(4), y)
    assert [tuple(f.shape) for f in feats] == [(4, 16, 32)] * 3        # (B, tokens, D)
    # each token's channels are normalised: rescaling a token changes nothing, mixing does
    scaled = [f * torch.rand(4, 16, 1).add(0.5) for f in feats]
    assert normalized_feature_distance(feats, scaled).abs().max() < 1e-10
    assert normalized_feature_distance(feats, [f.flip(1) for f in feats]).min() > 1e-3
    logits = FeatureDiscriminator.for_features(feats)(feats)
    assert logits.shape == (4,)


def test_diffusers_dit_pipeline_folder_loads_as_a_latent_teacher(tmp_path):
    from diffusers import AutoencoderKL, DiTPipeline

    from gendistill.pipelines import load_pipeline

    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    dit = build_network((4, 8, 8), num_classes=10, network_type="dit", width=32, depth=2,
                        heads=2)
    DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler()).save_pretrained(tmp_path)
    teacher = load_pipeline(tmp_path)
    assert isinstance(teacher, TeacherPipeline) and teacher.conditioning == "class"
    out = teacher(class_labels=[3], num_inference_steps=2, output_type="np")
    assert out.latents.shape == (1, 1, 16, 16) and out.vae_latents.shape == (1, 4, 8, 8)
    assert out.images.shape == (1, 16, 16, 1)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_timesteps_are_the_networks_own_time_inputs(name):
    scheduler = SCHEDULERS[name]()
    net = build_network((1, 8, 8), num_classes=10, channels=(8, 16))
    teacher = denoiser_from_scheduler(net, scheduler)
    seen = []
    net.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["timestep"]),
                                  with_kwargs=True)
    sigma = torch.tensor([teacher.sigma_max, 20.0, 1.0, 0.1])
    with torch.no_grad():
        teacher(torch.randn(4, 1, 8, 8), sigma, torch.tensor([0, 1, 2, 3]))
    # timestep_sigma inverts what the network is fed
    torch.testing.assert_close(teacher.timestep_sigma(seen[0].double()).float(), sigma,
                               rtol=1e-4, atol=0)
    if name in ("edm", "flow"):  # and agrees with the diffusers scheduler's own pairs
        scheduler.set_timesteps(6)
        expected = scheduler.sigmas[:-1].double()
        if name == "flow":
            expected = (expected / (1 - expected)).clamp(max=teacher.sigma_max)
        torch.testing.assert_close(teacher.timestep_sigma(scheduler.timesteps.double()),
                                   expected, rtol=1e-5, atol=0)
    elif name != "vp-x0":
        alphas = scheduler.alphas_cumprod[[999, 500, 0]].double()
        torch.testing.assert_close(teacher.timestep_sigma(torch.tensor([999.0, 500, 0], dtype=torch.float64)),
                                   ((1 - alphas) / alphas).sqrt(), rtol=1e-5, atol=0)
    if name != "edm":  # EDM's time input is unbounded
        with pytest.raises(ValueError, match="timesteps: .* knows timesteps 0 ..."):
            teacher.timestep_sigma(torch.tensor([5000.0]))


def test_pipelines_take_timesteps_as_diffusers_pipelines_do():
    scheduler = SCHEDULERS["vp-eps"]()
    net = build_network((1, 8, 8), num_classes=10, channels=(8, 16))
    teacher = TeacherPipeline(net, scheduler)
    denoiser = teacher.denoiser()
    student = CTMPipeline(student_of(denoiser, scheduler, net),
                          CTMScheduler(sigma_min=0.01, sigma_max=denoiser.sigma_max))
    z, kw = torch.randn(2, 1, 8, 8), dict(class_labels=[3, 7], output_type="latent")
    starts = denoiser.timestep_sigma(torch.tensor([999.0, 600.0, 200.0])).float()
    for pipe, sigmas in ((teacher, starts), (student, torch.cat([starts, torch.tensor([0.01])]))):
        pipe.set_progress_bar_config(disable=True)
        torch.testing.assert_close(pipe(timesteps=[999, 600, 200], latents=z, **kw).samples,
                                   pipe(sigmas=sigmas, latents=z, **kw).samples)
        with pytest.raises(ValueError, match="give timesteps or sigmas, not both"):
            pipe(timesteps=[999], sigmas=[10.0, 0.0], **kw)
        with pytest.raises(ValueError, match="strictly decreasing"):
            pipe(timesteps=[200, 600], **kw)
