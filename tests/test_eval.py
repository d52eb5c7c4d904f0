"""Evaluation metrics against references: Fréchet distance vs scipy, 2-D metrics vs closed forms,
the shipped domain classifiers, FID / FAD behaviour on real data, checkpoint plumbing with random
weights, and ``evaluate`` end to end on tiny random teachers."""
import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from diffusers import EDMEulerScheduler

from gendistill.cli import main
from gendistill.data import load_dataset
from gendistill.eval import classifier as clf_mod
from gendistill.eval.accuracy import conditional_accuracy
from gendistill.eval.evaluate import evaluate_pipeline
from gendistill.eval.fad import (ClapEmbedding, VGGish, VGGishEmbedding, VGGishFrontend,
                                 domain_fad, fad, load_audio_embedding)
from gendistill.eval.fid import domain_fid, inception_fid, to_inception_input
from gendistill.eval.frechet import frechet_distance, frechet_distance_of_features, gaussian_stats
from gendistill.eval.evaluate import domain_precision_recall
from gendistill.eval.knn import knn_radii, precision_recall
from gendistill.eval.metrics2d import mmd_rbf, score_2d, sliced_wasserstein
from gendistill.models.networks import MLPNet, build_network
from gendistill.pipelines import TeacherPipeline


@pytest.fixture(scope="module")
def digits_test():
    return load_dataset("digits", "test")


@pytest.fixture(scope="module")
def digits_train():
    return load_dataset("digits", "train")


@pytest.fixture(scope="module")
def sounds_test():
    return load_dataset("synthsounds", "test")


# ---------------------------------------------------------------- Fréchet distance

def scipy_frechet(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_of_identical_sets_is_zero():
    f = torch.randn(400, 16) @ torch.randn(16, 16)
    assert frechet_distance_of_features(f, f) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("dim", [3, 16, 64])
def test_frechet_matches_scipy_sqrtm(dim):
    rng = np.random.default_rng(dim)
    a, b = torch.randn(dim, dim, dtype=torch.float64), torch.randn(dim, dim, dtype=torch.float64)
    s1 = (a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)).numpy()
    s2 = (b @ b.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)).numpy()
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-3)
    # fitted to samples, including a rank-deficient covariance (fewer samples than dims)
    x, y = rng.standard_normal((dim // 2 + 2, dim)), rng.standard_normal((300, dim)) + 0.3
    (m1, c1), (m2, c2) = gaussian_stats(x), gaussian_stats(y)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(
        scipy_frechet(m1.numpy(), c1.numpy(), m2.numpy(), c2.numpy()), rel=1e-3)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one size"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- exact 2-D metrics

def test_sliced_wasserstein_gaussian_translation():
    g = torch.Generator().manual_seed(0)
    m = torch.tensor([1.2, -0.9])  # |m| = 1.5
    x = torch.randn(4000, 2, generator=g)
    y = torch.randn(4000, 2, generator=g) + m
    same = torch.randn(4000, 2, generator=g)
    # E over directions of (theta . m)^2 is |m|^2 / d: SW2 = |m| / sqrt(2) in 2-D ...
    assert sliced_wasserstein(x, y) == pytest.approx(1.5 / 2 ** 0.5, rel=0.03)
    # ... and the dimension-scaled variant reads a translation as its length |m| (= W2).
    assert sliced_wasserstein(x, y, scale_by_dim=True) == pytest.approx(1.5, rel=0.03)
    assert sliced_wasserstein(x, same) < 0.05
    # unequal sizes go through the quantile functions
    assert sliced_wasserstein(x[:1000], y) == pytest.approx(1.5 / 2 ** 0.5, rel=0.05)


def test_mmd_same_vs_shifted():
    g = torch.Generator().manual_seed(1)
    x, same = torch.randn(1500, 2, generator=g), torch.randn(1500, 2, generator=g)
    shifted = torch.randn(1500, 2, generator=g) + torch.tensor([0.5, 0.0])
    h = 0.5
    near_zero, far = mmd_rbf(x, same, bandwidth=h), mmd_rbf(x, shifted, bandwidth=h)
    # closed form for N(0, I) vs N(m, I) in d dims: 2 c (1 - exp(-|m|^2 / (2 (h^2 + 2)))),
    # c = (h^2 / (h^2 + 2))^(d/2)
    exact = 2 * (h ** 2 / (h ** 2 + 2)) * (1 - np.exp(-0.25 / (2 * (h ** 2 + 2))))
    assert far == pytest.approx(exact, abs=2e-3)
    assert abs(near_zero) < 1e-3 and far > 20 * abs(near_zero)
    assert mmd_rbf(x, same, 0.5, unbiased=False) > near_zero  # the V-statistic is biased up


def test_score_2d_per_class_on_toy2d():
    ds = load_dataset("toy2d", "test")
    labels = torch.arange(4).repeat_interleave(300)
    g = torch.Generator().manual_seed(2)
    a, b = ds.sample_true(labels, g), ds.sample_true(labels, g)
    good = score_2d(a, labels, b, labels, ds.class_names)
    bad = score_2d(a + 0.3, labels, b, labels, ds.class_names)
    assert set(good["per_class"]) == set(ds.class_names)
    assert good["SW2"] < 0.05 and bad["SW2"] > 4 * good["SW2"]
    assert bad["MMD"] > 10 * abs(good["MMD"])
    assert all(bad["per_class"][k]["SW2"] > good["per_class"][k]["SW2"] for k in ds.class_names)
    assert good["precision"] > 0.95 and bad["precision"] < 0.7


# ---------------------------------------------------------------- k-NN precision / recall

def test_precision_recall_exact_on_a_line():
    """Reals 0..9 (1-NN radius 1); fakes 0.5..4.5 and 20..24 (1-NN radius 1): half the fakes
    lie in a real ball; reals 0..5 lie within 1 of a fake; each near fake is in two real balls."""
    real = torch.arange(10.0).unsqueeze(1)
    fake = torch.cat([torch.arange(5.0) + 0.5, torch.arange(20.0, 25.0)]).unsqueeze(1)
    assert knn_radii(real, 1).tolist() == [1.0] * 10
    pr = precision_recall(real, fake, k=1)
    assert (pr["precision"], pr["recall"], pr["density"], pr["coverage"]) == (0.5, 0.6, 1.0, 0.6)
    same = precision_recall(real, real, k=1)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    with pytest.raises(ValueError, match="need more than 5 points"):
        precision_recall(real[:4], fake[:4])


def _toy2d_cases(n_per_class=1000):
    """The exact toy2d distribution, a second sample of it, a blurred copy, and a copy whose
    ring lost one of its eight modes (its points moved onto the next mode)."""
    import math

    labels = torch.arange(4).repeat_interleave(n_per_class)
    g = torch.Generator().manual_seed(0)
    sample = lambda: load_dataset("toy2d", "test").sample_true(labels, g)  # noqa: E731
    real, same = sample(), sample()
    blurred = sample() + 0.12 * torch.randn(len(labels), 2, generator=g)
    dropped = same.clone()
    ring = dropped[labels == 0]
    mode0 = torch.atan2(ring[:, 1], ring[:, 0]).abs() < math.pi / 8
    ring[mode0] = ring[mode0] @ torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # rotated by 90°
    dropped[labels == 0] = ring
    return labels, real, same, blurred, dropped


def test_toy2d_metrics_see_blur_and_a_dropped_mode():
    labels, real, same, blurred, dropped = _toy2d_cases()
    names = ["ring", "pinwheel", "checkerboard", "spiral"]
    s_same, s_blur, s_drop = (score_2d(x, labels, real, labels, names)
                              for x in (same, blurred, dropped))
    # identical distributions: precision and recall near 1, MMD² near 0
    assert s_same["precision"] > 0.97 and s_same["recall"] > 0.97
    assert abs(s_same["MMD"]) < 3e-4
    # a blur: precision falls, recall does not; MMD² at the modes' scale sees it
    assert s_blur["precision"] < 0.85 and s_blur["recall"] > 0.97
    assert s_blur["MMD"] > 10 * abs(s_same["MMD"]) + 2e-3
    # one of the ring's eight modes dropped: 1/8 of the ring's reals uncovered
    ring_recall = s_drop["per_class"]["ring"]["recall"]
    assert ring_recall == pytest.approx(7 / 8, abs=0.03)
    assert s_drop["per_class"]["ring"]["precision"] > 0.97
    assert s_drop["per_class"]["ring"]["MMD"] > 10 * abs(s_same["per_class"]["ring"]["MMD"])


def test_domain_precision_recall_sees_blur_and_a_dropped_class(digits_test, digits_train):
    x = digits_test.x
    same = domain_precision_recall(x, x, "digits")
    assert same["precision"] == same["recall"] == 1.0
    real_real = domain_precision_recall(x, digits_train.x, "digits")
    assert real_real["precision"] > 0.8 and real_real["recall"] > 0.8
    # blurred digits: a 3x3 box blur keeps the classes but leaves the image manifold
    blurred = torch.nn.functional.avg_pool2d(digits_train.x, 3, stride=1, padding=1,
                                             count_include_pad=False)
    blur = domain_precision_recall(x, blurred, "digits")
    assert blur["precision"] < real_real["precision"] - 0.15
    # no zeros: every 0 replaced by another digit of the train split
    keep = digits_train.x[digits_train.y != 0]
    no_zero = domain_precision_recall(x, keep[torch.randperm(len(keep))[:len(x)]], "digits")
    # about a tenth of the reals (the zeros) lose their neighbours
    assert no_zero["recall"] < real_real["recall"] - 0.06


# ---------------------------------------------------------------- domain classifiers

def test_shipped_classifiers_meet_their_accuracy(digits_test, sounds_test):
    digits = clf_mod.load_classifier("digits")
    sounds = clf_mod.load_classifier("synthsounds")
    acc_d = clf_mod.accuracy(digits, digits_test.x, digits_test.y)
    acc_s = clf_mod.accuracy(sounds, sounds_test.x, sounds_test.family)
    assert acc_d >= 0.95 and acc_s >= 0.90
    assert acc_d == pytest.approx(digits.config["test_accuracy"], abs=1e-3)
    assert digits.features(digits_test.x[:3]).shape == (3, digits.num_features)


def test_missing_classifier_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setattr(clf_mod, "CLASSIFIERS_DIR", tmp_path)
    clf_mod.load_classifier.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="gendistill train-classifier digits"):
            clf_mod.load_classifier("digits")
    finally:
        clf_mod.load_classifier.cache_clear()


def test_train_classifier_command_writes_a_loadable_folder(tmp_path, capsys):
    out = tmp_path / "clf"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: two threads only fight over a busy 2-core machine
    try:
        assert main(["train-classifier", "digits", "--epochs", "1", "--out", str(out),
                     "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "digits classifier: test accuracy" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_classes"] == 10 and 0 <= cfg["test_accuracy"] <= 1
    model = clf_mod.load_classifier_from(out)
    assert model.predict(torch.zeros(5, 1, 8, 8)).shape == (5,)
    assert main(["train-classifier", "mnist", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no domain classifier recipe for 'mnist'" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- FID / FAD / accuracy

def test_domain_fid_real_vs_real_small_real_vs_noise_large(digits_test, digits_train):
    real_real = domain_fid(digits_test.x, digits_train.x)
    noise = torch.rand(360, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real_noise = domain_fid(digits_test.x, noise)
    assert real_real < 2.0 and real_noise > 25 * real_real
    # torchmetrics' features + our Fréchet step = the Fréchet distance of the features
    clf = clf_mod.load_classifier("digits")
    with torch.no_grad():
        direct = frechet_distance_of_features(clf.features(digits_test.x),
                                              clf.features(digits_train.x))
    assert real_real == pytest.approx(direct, rel=1e-4)
    # ... and agrees with torchmetrics' own Fréchet step on the same running sums
    from torchmetrics.image.fid import FrechetInceptionDistance

    from gendistill.eval.classifier import ClassifierFeatures
    from gendistill.eval.fid import _fid_metric_class

    metric = _fid_metric_class()(feature=ClassifierFeatures(clf))
    metric.update(digits_test.x, real=True)
    metric.update(noise, real=False)
    assert float(metric.compute()) == pytest.approx(real_noise, rel=1e-6)
    assert float(FrechetInceptionDistance.compute(metric)) == pytest.approx(real_noise, rel=1e-4)


def test_conditional_accuracy_real_vs_shuffled(digits_test, sounds_test):
    assert conditional_accuracy(digits_test.x, digits_test.y, "digits") >= 0.95
    shuffled = digits_test.y[torch.randperm(len(digits_test.y))]
    assert conditional_accuracy(digits_test.x, shuffled, "digits") < 0.3
    captions = sounds_test.captions
    assert conditional_accuracy(sounds_test.x, captions, "synthsounds") >= 0.9
    order = torch.randperm(len(captions)).tolist()
    assert conditional_accuracy(sounds_test.x, [captions[i] for i in order], "synthsounds") < 0.3


def test_domain_fad_real_vs_real_small_real_vs_noise_large(sounds_test):
    half = len(sounds_test) // 2
    idx = torch.randperm(len(sounds_test))
    a, b = sounds_test.x[idx[:half]], sounds_test.x[idx[half:]]
    noise = torch.rand_like(a) * 2 - 1
    assert domain_fad(a, noise) > 20 * domain_fad(a, b)
    emb = load_audio_embedding("domain")
    assert fad(a, b, emb) == pytest.approx(domain_fad(a, b))
    with pytest.raises(ValueError, match="checkpoint path"):
        load_audio_embedding("vggish")


def random_inception_weights(path, monkeypatch):
    """Save a randomly initialised torch-fidelity Inception state_dict (nothing downloaded)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    cls = tf_inception.FeatureExtractorInceptionV3
    with monkeypatch.context() as m:  # build it without its weight download / load
        m.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(cls, "load_state_dict", lambda self, *a, **k: None)
        net = cls("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)
    return path


def test_inception_fid_plumbing_with_random_weights(tmp_path, monkeypatch, digits_test):
    images = to_inception_input(torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1).expand(2, 1, 8, 8))
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 299, 299)
    assert images[0].max() == 0 and images[1].min() == 255
    weights = random_inception_weights(tmp_path / "inception.pth", monkeypatch)
    # 64-d Inception features keep the check fast; 2048 (the default) is the same plumbing
    value = inception_fid(digits_test.x[:6], digits_test.x[6:12], weights, feature=64)
    assert np.isfinite(value) and value >= 0
    with pytest.raises(FileNotFoundError, match="Inception weights file not found"):
        inception_fid(digits_test.x[:4], digits_test.x[4:8], tmp_path / "none.pth")


def test_vggish_plumbing_with_random_weights(tmp_path):
    frontend = VGGishFrontend()
    assert frontend(torch.zeros(2, 15872)).shape == (2, 1, 96, 64)
    torch.manual_seed(0)
    state = {k.replace("features.", "features_network.").replace("embeddings.",
                                                                 "embedding_network."): v
             for k, v in VGGish().state_dict().items()}  # torchaudio's key layout
    torch.save(state, tmp_path / "vggish.pt")
    emb = VGGishEmbedding(tmp_path / "vggish.pt")
    waves = 0.1 * torch.randn(3, 15872)
    out = emb(waves, 16000)
    assert out.shape == (3, 128) and torch.isfinite(out).all()
    assert emb(0.1 * torch.randn(2, 24000), 8000).shape == (6, 128)  # resampled, 3 examples
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not VGGish weights"):
        VGGishEmbedding(tmp_path / "bad.pt")


def test_clap_plumbing_with_random_weights(tmp_path):
    from transformers import (ClapAudioConfig, ClapAudioModelWithProjection, ClapConfig,
                              ClapFeatureExtractor, ClapModel)

    audio = dict(depths=[1, 1], num_attention_heads=[2, 2], patch_embeds_hidden_size=16,
                 hidden_size=32, projection_dim=16, spec_size=256, num_mel_bins=64)
    text = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=37, projection_dim=16, max_position_embeddings=64)
    ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=16)) \
        .save_pretrained(tmp_path / "clap")
    ClapFeatureExtractor().save_pretrained(tmp_path / "clap")
    ClapAudioModelWithProjection(ClapAudioConfig(**audio)).save_pretrained(tmp_path / "audio")
    waves = 0.1 * torch.randn(3, 15872)
    for folder in ("clap", "audio"):
        out = load_audio_embedding("clap", tmp_path / folder)(waves, 16000)
        assert out.shape == (3, 16)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(3, dtype=out.dtype))
    with pytest.raises(FileNotFoundError):
        ClapEmbedding(tmp_path / "nothing")


# ---------------------------------------------------------------- evaluate

def toy_teacher():
    pipe = TeacherPipeline(MLPNet(in_dim=2, width=32, depth=2, num_class_embeds=5),
                           EDMEulerScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_evaluate_toy2d_counts_nfe_and_scores():
    pipe = toy_teacher()
    res = evaluate_pipeline(pipe, "toy2d", 200, 0, progress=False, num_inference_steps=2)
    assert res["score_name"] == "MMD²" and res["nfe"] == 3  # Heun, 2 steps: 2 + 1 calls
    assert res["SW2"] > res["SW2_floor"] and 0 <= res["precision"] <= 1
    assert res["score"] > res["score_floor"] and set(res["per_class"]) == {
        "ring", "pinwheel", "checkerboard", "spiral"}
    assert res["cond_acc"] is None and res["num_samples"] == 200
    guided = evaluate_pipeline(pipe, "toy2d", 40, 0, progress=False, num_inference_steps=2,
                               guidance_scale=2.0, batch_size=16)
    assert guided["nfe"] == 6  # CFG doubles every row
    json.dumps(guided)
    for p in pipe.unet.parameters():
        p.data.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN / inf"):
        evaluate_pipeline(pipe, "toy2d", 8, 0, progress=False, num_inference_steps=1)


def test_evaluate_digits_and_synthsounds_tiny_teachers():
    digits = TeacherPipeline(build_network((1, 8, 8), num_classes=10, channels=(8, 16)),
                             EDMEulerScheduler())
    res = evaluate_pipeline(digits, "digits", 40, 0, progress=False, num_inference_steps=1)
    assert res["score_name"] == "domain FID" and res["score"] > res["score_floor"]
    assert 0 <= res["cond_acc"] <= 1 and res["nfe"] == 1
    assert res["recall"] < 0.3  # an untrained network makes one kind of image
    sounds = TeacherPipeline(build_network((1, 32, 32), cross_attention_dim=384, channels=(8, 16)),
                             EDMEulerScheduler(), text_encoder_name="all-MiniLM-L6-v2")
    res = evaluate_pipeline(sounds, "synthsounds", 16, 0, progress=False, num_inference_steps=1)
    assert res["score_name"] == "domain FAD" and res["score"] > res["score_floor"]
    assert 0 <= res["cond_acc"] <= 1
    assert res["am_depth_ratio"] > 0 and "tremolo" in res["modulation_per_family"]
    # an untrained network's one step lands near 0: nothing dark, so no grain is measured
    assert res["grain_real"] > 0 and res["grain"] is None and res["grain_ratio"] is None
    assert res["attribute_n"] == 16 and res["attribute_acc_real"] > 0.9
    with pytest.raises(ValueError, match="makes samples of shape"):
        evaluate_pipeline(digits, "synthsounds", 8, 0, progress=False)


def test_grain_sees_speckle_on_a_dark_background_that_domain_fid_barely_sees(digits_test):
    """Grain of real digits is small; the same digits with faint noise on their dark background
    (|noise| about 0.05, well below a stroke) have several times the grain, while their domain
    FID against the test split stays near zero. A flat dark image has none; nothing dark, 0."""
    from gendistill.eval.grain import grain

    x = digits_test.x
    torch.manual_seed(0)
    speckled = torch.where(x < -0.8, (x + 0.06 * torch.randn_like(x)).clamp(-1, -0.81), x)
    assert grain(x) < 0.02 and grain(speckled) > 3 * grain(x)
    assert domain_fid(x, speckled, "digits") < 0.1
    assert grain(torch.full((4, 1, 8, 8), -1.0)) == 0
    # nothing dark, or NaN samples: nothing measured, which is not the same as smooth
    assert grain(torch.ones(4, 1, 8, 8)) is None
    assert grain(torch.full((4, 1, 8, 8), float("nan"))) is None


def test_modulation_depths_see_flattened_tremolo_and_wobble(sounds_test):
    """Real clips against themselves: every ratio is 1. Against the same clips smoothed over
    time (a moving average of 5 frames, about one period of the fast tremolo and a fifth of
    the slow siren's): the tremolo's AM depth falls far more than the siren's FM depth."""
    from gendistill.data.synthsounds import FAMILIES, MODULATED
    from gendistill.eval.accuracy import caption_families
    from gendistill.eval.modulation import am_depth, fm_depth, modulation_depths
    from gendistill.pipelines.audio import MelVocoder

    vocoder = MelVocoder(**sounds_test.vocoder)
    x, families = sounds_test.x, caption_families(sounds_test.captions)
    same = modulation_depths(x, families, x, families, vocoder, FAMILIES, MODULATED)
    assert same["am_depth_ratio"] == same["fm_depth_ratio"] == 1.0
    assert set(same["modulation_per_family"]) == {f for v in MODULATED.values() for f in v}
    padded = torch.nn.functional.pad(x, (2, 2, 0, 0), mode="replicate")
    smoothed = padded.unfold(-1, 5, 1).mean(-1)
    flat = modulation_depths(x, families, smoothed, families, vocoder, FAMILIES, MODULATED)
    per = flat["modulation_per_family"]
    assert per["tremolo"]["am"] < 0.75 and per["beeps"]["am"] < 0.9
    assert per["siren"]["fm"] > 0.85
    # a tone has neither: its depths are near 0, a tremolo's AM is several dB
    tone, tremolo = (x[families == FAMILIES.index(f)] for f in ("tone", "tremolo"))
    assert am_depth(tone, vocoder).mean() < 0.2 < 4 < am_depth(tremolo, vocoder).mean()
    assert fm_depth(tone, vocoder).mean() < 0.05


def test_cli_evaluate_writes_json(tmp_path, capsys):
    toy_teacher().save_pretrained(tmp_path / "model")
    out = tmp_path / "r.json"
    assert main(["evaluate", str(tmp_path / "model"), "--dataset", "toy2d", "--num-samples",
                 "80", "--steps", "2", "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["model"] == str(tmp_path / "model") and res["dataset"] == "toy2d"
    assert {"nfe", "score_name", "score", "cond_acc", "SW2", "precision", "recall"} <= set(res)
    assert "MMD²" in capsys.readouterr().out


@pytest.mark.parametrize("extra, needle", [
    (["--dataset", "mnist"], "cannot evaluate on dataset 'mnist'"),
    (["--dataset", "digits"], "the model makes samples of shape (2,), dataset digits has"),
    (["--dataset", "toy2d", "--num-samples", "1"], "--num-samples: 1 is out of range [2, 1000000]"),
    (["--dataset", "toy2d", "--vggish-weights", "/no/v.pt"], "VGGish / CLAP FAD is for audio"),
])
def test_cli_evaluate_bad_input_is_one_line_and_exit_2(extra, needle, tmp_path, capsys):
    toy_teacher().save_pretrained(tmp_path / "model")
    assert main(["evaluate", str(tmp_path / "model"), *extra, "--out",
                 str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert main(["evaluate", "/no/model", "--dataset", "toy2d", "--out", "x.json"]) == 2


def test_help_of_the_new_commands(capsys):
    for cmd in ("evaluate", "calibrate", "train-classifier"):
        with pytest.raises(SystemExit) as exit_info:
            main([cmd, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: gendistill {cmd}" in capsys.readouterr().out


def test_calibrate_chooses_the_start_on_the_train_split_and_saves_it(tmp_path, monkeypatch,
                                                                     capsys):
    """``gendistill calibrate`` on the shipped digits student: from sigma_max its single jump
    loses variety (train-split domain FID about twice that from 10), so of the starts 80 and 10
    it keeps 10, writes it into the folder's scheduler with the sweep beside it, and never
    loads the test split. --dry-run changes nothing; a teacher is refused in one line."""
    import shutil

    import gendistill.data as data
    from gendistill.assets import ASSETS
    from gendistill.pipelines import load_pipeline
    from gendistill.pipelines.remote import save_component

    folder = tmp_path / "student"
    shutil.copytree(ASSETS / "students" / "digits", folder)
    config = folder / "scheduler" / "scheduler_config.json"
    splits = []
    real_load = data.load_dataset
    monkeypatch.setattr(data, "load_dataset",
                        lambda name, split, **kw: splits.append(split) or real_load(name, split,
                                                                                     **kw))
    args = ["calibrate", str(folder), "--dataset", "digits", "--starts", "80,10", "--guidance",
            "1", "--num-samples", "300", "--no-progress"]
    before = config.read_text(), (folder / "calibration.json").read_text()
    assert main([*args, "--dry-run"]) == 0
    assert (config.read_text(), (folder / "calibration.json").read_text()) == before
    # the shipped student jumps from 3 (Gaussian start): start it from 80 so that the choice
    # shows, and from noise
    pipe = load_pipeline(folder)
    pipe.scheduler.register_to_config(one_step_sigma=80.0)
    pipe.scheduler.save_pretrained(folder / "scheduler")
    save_component(folder, "start", None)
    assert main(args) == 0
    report = json.loads((folder / "calibration.json").read_text())
    scores = {(row["sigma"], row["start"]): row["score"] for row in report["starts"]}
    # from sigma_max the Gaussian start is the noise itself: tried once
    assert set(scores) == {(80.0, "noise"), (10.0, "noise"), (10.0, "gaussian")}
    assert scores[80.0, "noise"] > 1.5 * max(scores[10.0, "noise"], scores[10.0, "gaussian"])
    assert report["one_step_sigma"] == 10.0 and report["previous_one_step_sigma"] == 80.0
    loaded = load_pipeline(folder)
    assert loaded.scheduler.config.one_step_sigma == 10.0
    assert (loaded.start is None) == (report["start"] == "noise")
    assert set(splits) == {"train"}
    # what evaluate then reads says where the jump started and from what
    result = evaluate_pipeline(loaded, "digits", 20, 0, progress=False, guidance_scale=1.0)
    assert (result["start_sigma"], result["start"]) == (10.0, report["start"])
    out = capsys.readouterr().out
    assert "one_step_sigma 80 -> 10" in out and "start sigma 10: domain FID" in out
    # each start's grain is printed, held to 1.1x the default start's
    assert report["grain_limit"] == pytest.approx(1.1 * next(
        row["grain"] for row in report["starts"] if row["sigma"] == 10.0)) and ", grain " in out
    assert main(["calibrate", str(ASSETS / "teachers" / "digits"), "--dataset", "digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert "calibration chooses a CTM student's start" in err and len(err.splitlines()) == 1


def test_calibration_starts_stay_inside_the_students_range():
    from gendistill.eval.calibrate import candidate_starts, reference_start
    from gendistill.pipelines import CTMScheduler

    assert candidate_starts(CTMScheduler(sigma_max=10.0), (80, 20, 10, 5, 0.001)) == [10.0, 5.0]
    # the reference start (the grain every choice is held to) is measured when given
    assert candidate_starts(CTMScheduler(), (80, 20)) == [80.0, 20.0]
    assert candidate_starts(CTMScheduler(), (80, 20), reference=10.0) == [80.0, 20.0, 10.0]
    scheduler = CTMScheduler(sigma_max=8.0)
    assert candidate_starts(scheduler, (5,), reference_start(scheduler)) == [8.0, 5.0]
    with pytest.raises(ValueError, match=r"no start in the student's range \(0.002, 80\]"):
        candidate_starts(CTMScheduler(), (0.001,))


def test_calibration_does_not_buy_a_score_with_grain():
    """The shipped sound student's train-split sweep (FAD, grain): FAD alone prefers 5, whose
    grain is 1.62x that from 10; held to 1.1x the grain from 10, the choice is 10. Without
    the grain rule, or where the reference start has no grain, the best score wins; a start
    whose jump made nothing dark is no choice under a limit."""
    from gendistill.eval.calibrate import best_start, grain_limit, mark_eligible

    def choose(sweep, limit):
        mark_eligible(sweep, limit)
        return best_start(sweep)["sigma"]

    sweep = [{"sigma": s, "score": f, "grain": g} for s, f, g in
             [(80.0, 2.880, 0.01304), (40.0, 2.525, 0.01289), (20.0, 2.127, 0.01325),
              (10.0, 1.734, 0.01586), (7.0, 1.582, 0.01953), (5.0, 1.528, 0.02565)]]
    limit = grain_limit(sweep, 10.0, 0.1)
    assert limit == pytest.approx(0.01586 * 1.1)
    assert choose(sweep, limit) == 10.0
    assert [row["sigma"] for row in sweep if not row["eligible"]] == [7.0, 5.0]
    assert choose(sweep, grain_limit(sweep, 10.0, 0.25)) == 7.0
    assert grain_limit(sweep, 10.0, math.inf) is None and choose(sweep, None) == 5.0
    sweep[5]["grain"] = None  # nothing dark from 5: not measured, so not shown to be smooth
    assert choose(sweep, limit) == 10.0 and choose(sweep, None) == 5.0
    sweep[3]["grain"] = None  # the reference made nothing dark: nothing to hold others to
    assert grain_limit(sweep, 10.0, 0.1) is None
    sweep[3]["score"] = math.nan
    for row in sweep:
        row["grain"] = 0.05
    with pytest.raises(ValueError, match="no start has a finite score and at most the grain"):
        choose(sweep, 0.01)


def test_calibrate_refuses_a_grainy_start_end_to_end(tmp_path, monkeypatch, capsys):
    """``gendistill calibrate --starts 80,5`` also measures the default start 10 from noise, and
    refuses noise from 5 (best score, 1.5x the grain from 10) in what it prints and saves; the
    Gaussian start from 5, as smooth as 10, is chosen and saved as the folder's start/ (from 80
    it is the noise: not tried). ``--start-kinds noise`` takes 10 and removes start/;
    ``--max-grain-increase inf`` takes noise from 5 without measuring 10; a student whose range
    ends at 5 tries both kinds there; a negative value or an unknown kind is a one-line
    error."""
    import shutil

    import gendistill.eval.calibrate as calibrate
    from gendistill.assets import ASSETS
    from gendistill.pipelines import load_pipeline
    from gendistill.pipelines.remote import save_component

    folder = tmp_path / "student"
    shutil.copytree(ASSETS / "students" / "digits", folder)
    save_component(folder, "start", None)  # the shipped student's Gaussian start: from noise
    measured = []

    def evaluate(pipe, dataset, num_samples, seed, split, progress, sigmas, **kw):
        trial = (sigmas[0], "noise" if pipe.start is None else "gaussian")
        measured.append(trial)
        score, grain = {(80.0, "noise"): (1.0, 0.020), (10.0, "noise"): (0.8, 0.020),
                        (5.0, "noise"): (0.5, 0.030), (5.0, "gaussian"): (0.6, 0.021)}[trial]
        return {"score": score, "grain": grain, "num_samples": 10, "score_name": "domain FID"}

    monkeypatch.setattr(calibrate, "evaluate_pipeline", evaluate)
    args = ["calibrate", str(folder), "--dataset", "digits", "--starts", "80,5",
            "--no-progress"]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert measured == [(80.0, "noise"), (10.0, "noise"), (5.0, "noise"), (5.0, "gaussian")]
    assert "best start: 5 (gaussian)" in out and not (folder / "start").exists()
    assert "start sigma 5: domain FID 0.5 (train split), grain 0.03: above 0.022, not a " \
           "choice" in out
    assert main(args) == 0
    assert "-> 5 (gaussian): wrote" in capsys.readouterr().out
    assert load_pipeline(folder).start.config.num_conditions == 10
    measured.clear()
    assert main([*args, "--start-kinds", "noise"]) == 0
    assert measured == [(80.0, "noise"), (10.0, "noise"), (5.0, "noise")]
    assert "one_step_sigma 5 (gaussian) -> 10: wrote" in capsys.readouterr().out
    assert load_pipeline(folder).start is None and not (folder / "start").exists()
    measured.clear()
    assert main([*args, "--max-grain-increase", "inf", "--start-kinds", "noise"]) == 0
    assert measured == [(80.0, "noise"), (5.0, "noise")] and "-> 5:" in capsys.readouterr().out
    # a student trained below 10 (``ctm.sigma_max=5``): its grain reference is noise at its
    # sigma_max, and the Gaussian start is tried there too (its noise enters at 80, not 5)
    pipe = load_pipeline(folder)
    pipe.scheduler.register_to_config(sigma_max=5.0)
    pipe.scheduler.save_pretrained(folder / "scheduler")
    measured.clear()
    assert main([*args, "--dry-run"]) == 0
    assert measured == [(5.0, "noise"), (5.0, "gaussian")]
    assert main([*args, "--max-grain-increase", "-1"]) == 2
    assert "max_grain_increase must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--start-kinds", "noise,latent"])
    assert "expected some of noise,gaussian, got 'noise,latent'" in capsys.readouterr().err


def test_the_bench_calibrates_a_student_again_only_when_the_setting_changed(tmp_path):
    """calibrate_cached keeps a folder's calibration for the same dataset, omega and sample
    count, and chooses again when the omega it is asked for differs from the saved one."""
    import shutil

    from gendistill.assets import ASSETS
    from gendistill.eval.bench import calibrate_cached

    folder = tmp_path / "student"
    shutil.copytree(ASSETS / "students" / "digits", folder)
    logs = []
    first = calibrate_cached(folder, "digits", 1.0, 100, logs.append)
    starts = ["40", "20", "10", "7", "5", "3", "2", "1.5"]
    assert len(logs) == 1 and set(first["scores"]) == {
        "80", *starts, *(f"{s} (gaussian)" for s in starts)}
    assert calibrate_cached(folder, "digits", 1.0, 100, logs.append) == first and len(logs) == 1
    calibrate_cached(folder, "digits", 3.0, 100, logs.append)
    assert len(logs) == 2 and "omega 3" in logs[1]
    saved = json.loads((folder / "calibration.json").read_text())
    assert saved["call_kwargs"] == {"guidance_scale": 3.0}
    # a calibration from before the grain check, or before the Gaussian start, is made again
    for key in ("max_grain_increase", "kinds"):
        del saved[key]
        (folder / "calibration.json").write_text(json.dumps(saved))
        calibrate_cached(folder, "digits", 3.0, 100, logs.append)
        saved = json.loads((folder / "calibration.json").read_text())
    assert len(logs) == 4


def test_attribute_accuracy_reads_pitch_and_loudness_of_real_clips():
    """Real test clips have the pitch and loudness their captions name (read against the
    train clips' medians per family); the same clips under captions whose low and high are
    swapped keep only the mid clips' pitch (1/3), under quiet and loud swapped none of their
    loudness; a caption naming no pitch is left out."""
    from gendistill.data import load_dataset
    from gendistill.data.synthsounds import attributes_of
    from gendistill.eval.attributes import attribute_accuracy
    from gendistill.pipelines.audio import MelVocoder

    assert attributes_of("a loud high siren, fast") == (7, 1, 2, 1)
    assert attributes_of("tone sound, low pitch, quiet and slow") == (0, 0, 0, 0)
    assert attributes_of("a highway at night") == (-1, -1, -1, -1)
    train, test = load_dataset("synthsounds", "train"), load_dataset("synthsounds", "test")
    vocoder = MelVocoder(**train.vocoder)
    result = attribute_accuracy(train.x, train.captions, test.x, test.captions, vocoder)
    assert result["pitch_acc"] > 0.9 and result["loudness_acc"] > 0.95
    assert result["attribute_acc"] > 0.9 and result["attribute_acc_real"] > 0.9

    def swap(caption, a, b):
        return " ".join(b if w == a else a if w == b else w for w in caption.split(" "))

    pitch_swapped = [swap(c, "low", "high") for c in test.captions]
    result = attribute_accuracy(train.x, train.captions, test.x, pitch_swapped, vocoder)
    assert 0.25 < result["pitch_acc"] < 0.34 and result["loudness_acc"] > 0.95
    loud_swapped = [swap(c, "quiet", "loud") for c in test.captions]
    result = attribute_accuracy(train.x, train.captions, test.x, loud_swapped, vocoder)
    assert result["loudness_acc"] < 0.05 and result["attribute_acc"] < 0.05
    some = [c if i % 2 else "a siren" for i, c in enumerate(test.captions)]
    result = attribute_accuracy(train.x, train.captions, test.x, some, vocoder)
    assert result["attribute_acc"] > 0.9 and result["attribute_n"] == len(test) // 2
    # a family the reference lacks is not read (no medians), nor is a caption naming nothing
    no_chirps = [i for i, c in enumerate(train.captions) if "chirp" not in c]
    result = attribute_accuracy(train.x[no_chirps], [train.captions[i] for i in no_chirps],
                                test.x, test.captions, vocoder)
    assert result["attribute_n"] == len(test) * 7 // 8 and result["attribute_acc"] > 0.9
    assert attribute_accuracy(train.x, train.captions, test.x[:2], ["a siren", "tones"],
                              vocoder)["attribute_acc"] is None
