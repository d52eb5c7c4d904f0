"""Score a pipeline on a built-in dataset: generate per condition, then the dataset's metric.

- ``toy2d``: RBF-MMD² at the data's own length scale (the score: a model that blurs the modes
  cannot pass it), sliced Wasserstein-2, k-NN precision / recall / density / coverage, against
  fresh exact samples of the true distribution with the same labels, per class and their mean.
- ``digits``: domain FID against the test split (the score), conditional accuracy, and k-NN
  precision / recall in the domain classifier's feature space; Inception FID as well when
  ``inception_weights`` is given; the grain of the dark background against the real images'
  (``eval.grain``, which the classifier's features do not see; synthsounds too).
- ``synthsounds``: domain FAD against the test split's log-mels (the score), conditional
  accuracy (sound family named by each caption), k-NN precision / recall in the classifier's
  feature space, the share of clips with the pitch and loudness their captions name
  (``eval.attributes``), and the depth of loudness (AM) and pitch (FM) movement within the
  clips against the real clips' (``eval.modulation``); prompts are the test-split captions.
  VGGish / CLAP FAD as well when their checkpoints are given (both sides vocoded with the
  same vocoder, so the vocoder's own loss is not counted against the model).

Images and log-mels are clamped to [−1, 1] before scoring, as the pipelines' outputs (image
postprocessing, the vocoder) clamp them. NFE is counted from real network calls (rows
processed / samples, so a CFG-doubled batch counts twice). ``score_floor`` is the same score
between two real sets (toy2d: two fresh true samples of the sizes used; digits / synthsounds:
test split vs train split, stored with the classifier), roughly what a perfect model would get,
to read the score against.
"""
from __future__ import annotations

import time
from functools import lru_cache

import torch

from ..data.synthsounds import MODULATED
from .accuracy import caption_families, conditional_accuracy
from .attributes import attribute_accuracy
from .fad import DOMAIN_FAD, ClapEmbedding, VGGishEmbedding, fad, fad_from_embeddings
from .fid import DOMAIN_FID, domain_fid, inception_fid
from .grain import grain
from .knn import DEFAULT_K, precision_recall
from .metrics2d import DEFAULT_BANDWIDTH, DEFAULT_PROJECTIONS, score_2d
from .modulation import modulation_depths

DATASETS = ("toy2d", "digits", "synthsounds")
DEFAULT_NUM_SAMPLES = {"toy2d": 2000, "digits": 1000, "synthsounds": 384}
SCORE_NAMES = {"toy2d": "MMD²", "digits": DOMAIN_FID, "synthsounds": DOMAIN_FAD}
REFERENCE_SEED_OFFSET = 1_000_003


def _check_dataset(dataset_name: str) -> None:
    if dataset_name not in DATASETS:
        raise ValueError(f"cannot evaluate on dataset {dataset_name!r}; choose one of "
                         f"{', '.join(DATASETS)}")


def _network(pipe):
    net = getattr(pipe, "network", None)
    return net if net is not None else pipe.unet


def _check_compatible(pipe, ds) -> None:
    from ..pipelines.base import mismatch

    if (why := mismatch(pipe, ds)) is not None:
        raise ValueError(f"the model {why}")


def _balanced_conditions(ds, n: int):
    """n class labels in equal shares (contiguous), or n test captions evenly spread."""
    if ds.captions is None:
        return (torch.arange(n) * ds.num_classes // n).tolist()
    m = len(ds.captions)
    idx = (torch.arange(n) * m // n) if n <= m else torch.arange(n) % m
    return [ds.captions[i] for i in idx.tolist()]


def generate_for_conditions(pipe, conditions: list, seed: int = 0, batch_size: int = 256,
                            progress: bool = True, **call_kwargs):
    """Sample one model-space sample per condition (class labels or prompts), batched through
    ``gendistill.generate.sample`` (batch i seeded ``seed + i``). Returns (samples, NFE per
    sample, network calls, seconds)."""
    from tqdm.auto import tqdm

    from ..diffusion import NFECounter
    from ..generate import sample

    clash = {"generator", "output_type", "class_labels", "prompt", "return_dict"} & \
        set(call_kwargs)
    if clash:
        raise ValueError(f"evaluation sets {', '.join(sorted(clash))} itself")
    text = bool(conditions) and isinstance(conditions[0], str)
    chunks = [conditions[i:i + batch_size] for i in range(0, len(conditions), batch_size)]
    old_bar = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.set_progress_bar_config(disable=True)
    out = []
    start = time.perf_counter()
    try:
        with NFECounter(_network(pipe)) as counter:
            for i, chunk in enumerate(tqdm(chunks, desc="sampling", disable=not progress)):
                result = sample(pipe, None if text else chunk, chunk if text else None, 1,
                                seed + i, **call_kwargs)
                out.append(result.latents.float().cpu())
    finally:
        pipe._progress_bar_config = old_bar
    seconds = time.perf_counter() - start
    x = torch.cat(out)
    return x, counter.rows / len(x), counter.calls, seconds


@lru_cache(maxsize=4)
def _score_floor(dataset_name: str) -> float:
    """The domain score of the real test split vs the real train split (stored with the
    classifier when it was trained; computed here for classifiers without it)."""
    from .classifier import load_classifier

    clf = load_classifier(dataset_name)
    if "frechet_test_vs_train" in clf.config:
        return float(clf.config["frechet_test_vs_train"])
    from ..data import load_dataset

    train, test = load_dataset(dataset_name, "train"), load_dataset(dataset_name, "test")
    if dataset_name == "digits":
        return domain_fid(test.x, train.x, clf)
    from .fad import domain_fad

    return domain_fad(test.x, train.x, clf)


def evaluate_pipeline(pipe, dataset_name: str, num_samples: int | None = None, seed: int = 0,
                      *, batch_size: int = 256, inception_weights=None, vggish_weights=None,
                      clap_model=None, progress: bool = True, split: str = "test",
                      **call_kwargs) -> dict:
    """Generate ``num_samples`` samples spread evenly over the dataset's conditions (default per
    dataset: toy2d 2000, digits 1000, synthsounds 384) and score them. ``call_kwargs`` go to the
    pipeline (``num_inference_steps``, ``guidance_scale``, ...). Returns a JSON-ready dict with
    ``dataset, pipeline, nfe, score_name, score, cond_acc`` and the other metrics.
    ``split="train"`` takes the conditions and the reference from the train split instead: a
    validation score for choosing a sampling setting (``eval.calibrate``); digits and
    synthsounds then give no score floor (it is test vs train) and no modulation depths."""
    from ..data import load_dataset

    _check_dataset(dataset_name)
    n = DEFAULT_NUM_SAMPLES[dataset_name] if num_samples is None else int(num_samples)
    if n < 2:
        raise ValueError(f"num_samples must be >= 2, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if dataset_name != "digits" and inception_weights is not None:
        raise ValueError("Inception FID is for image datasets (digits)")
    if dataset_name != "synthsounds" and (vggish_weights is not None or clap_model is not None):
        raise ValueError("VGGish / CLAP FAD is for audio datasets (synthsounds)")
    # Load user checkpoints first: a bad path fails before any sampling.
    extra_embeddings = {}
    if vggish_weights is not None:
        extra_embeddings["FAD (VGGish)"] = VGGishEmbedding(vggish_weights)
    if clap_model is not None:
        extra_embeddings["FAD (CLAP)"] = ClapEmbedding(clap_model)
    if inception_weights is not None:
        from .fid import inception_fid_metric

        inception_fid_metric(inception_weights)  # checks the file and torch-fidelity

    if split not in ("test", "train"):
        raise ValueError(f"split must be test or train, got {split!r}")
    real = load_dataset(dataset_name, split)  # the reference: the test split unless validating
    _check_compatible(pipe, real)
    conditions = _balanced_conditions(real, n)
    x, nfe, calls, seconds = generate_for_conditions(pipe, conditions, seed, batch_size,
                                                     progress, **call_kwargs)
    bad = int((~torch.isfinite(x.flatten(1))).any(1).sum())
    if bad:
        raise ValueError(f"the model generated {bad} of {len(x)} samples with NaN / inf values")
    if dataset_name != "toy2d":  # score what users get: images and log-mels live in [-1, 1]
        x = x.clamp(-1, 1)
    result = {
        "dataset": dataset_name, "pipeline": type(pipe).__name__, "num_samples": len(x),
        "seed": seed, "batch_size": batch_size, "call_kwargs": dict(call_kwargs),
        "nfe": round(nfe, 3), "network_calls": calls,
        "score_name": SCORE_NAMES[dataset_name], "score": None, "cond_acc": None,
    }
    if hasattr(pipe, "start"):  # a CTM student: where its first jump started, and from what
        result.update(start_sigma=round(float(pipe.scheduler.sigmas[0]), 6),
                      start="noise" if pipe.start is None else "gaussian")
    if dataset_name == "toy2d":
        labels = torch.tensor(conditions)
        g = torch.Generator().manual_seed(seed + REFERENCE_SEED_OFFSET)
        reference = real.sample_true(labels, g)
        scores = score_2d(x, labels, reference, labels, real.class_names, seed=seed)
        floor = score_2d(real.sample_true(labels, g), labels, reference, labels, seed=seed)
        result.update(score=scores["MMD"], SW2=scores["SW2"], per_class=scores["per_class"],
                      **{key: scores[key] for key in ("precision", "recall", "density",
                                                      "coverage")},
                      score_floor=floor["MMD"], SW2_floor=floor["SW2"],
                      precision_floor=floor["precision"], recall_floor=floor["recall"],
                      reference=f"{len(reference)} fresh samples of the true distribution",
                      metric_settings={"sw2_projections": DEFAULT_PROJECTIONS,
                                       "mmd": "unbiased MMD^2, Gaussian kernel, mean over "
                                              "classes", "mmd_bandwidth": DEFAULT_BANDWIDTH,
                                       "knn_k": DEFAULT_K, "knn": "mean over classes"})
    elif dataset_name == "digits":
        result.update(score=domain_fid(real.x, x, "digits"),
                      cond_acc=conditional_accuracy(x, torch.tensor(conditions), "digits"),
                      score_floor=_score_floor("digits") if split == "test" else None,
                      **domain_precision_recall(real.x, x, "digits"), **grain_of(real.x, x),
                      reference=f"digits {split} split ({len(real)} images)")
        if inception_weights is not None:
            result["FID"] = inception_fid(real.x, x, inception_weights)
    else:
        vocoder = _vocoder(pipe, real)
        result.update(score=fad(real.x, x, _domain_embedding()),
                      cond_acc=conditional_accuracy(x, caption_families(conditions),
                                                    "synthsounds"),
                      score_floor=_score_floor("synthsounds") if split == "test" else None,
                      **domain_precision_recall(real.x, x, "synthsounds"), **grain_of(real.x, x),
                      **attribute_accuracy(real.x, real.captions, x, list(conditions),
                                           vocoder),
                      reference=f"synthsounds {split} split ({len(real)} log-mels)")
        if split == "test":  # vocodes every real clip: not needed for a validation score
            result.update(modulation_depths(real.x, real.family, x, caption_families(conditions),
                                            vocoder, real.class_names, MODULATED))
        if extra_embeddings:
            rate = vocoder.config.sample_rate
            real_waves, fake_waves = vocoder(real.x), vocoder(x)
            for key, emb in extra_embeddings.items():
                result[key] = fad_from_embeddings(emb(real_waves, rate, progress),
                                                  emb(fake_waves, rate, progress))
            result["fad_reference"] = f"{split} split and samples, both through the vocoder"
    result.update(seconds=round(seconds, 3), ms_per_sample=round(1000 * seconds / len(x), 3))
    return result


def grain_of(real, fake) -> dict:
    """The samples' grain (``eval.grain``) beside the real split's, and their ratio."""
    mine, theirs = grain(fake), grain(real)
    return {"grain": None if mine is None else round(mine, 5),
            "grain_real": None if theirs is None else round(theirs, 5),
            "grain_ratio": round(mine / theirs, 4) if mine is not None and theirs else None}


def domain_precision_recall(real, fake, dataset_name: str, k: int = DEFAULT_K) -> dict:
    """k-NN precision / recall / density / coverage in the domain classifier's penultimate
    feature space (the space domain FID / FAD are measured in)."""
    from .classifier import load_classifier

    classifier = load_classifier(dataset_name)
    with torch.no_grad():
        features = [torch.cat([classifier.features(b) for b in x.float().split(512)])
                    for x in (real, fake)]
    return precision_recall(*features, k)


def _domain_embedding():
    from .fad import DomainEmbedding

    return DomainEmbedding("synthsounds")


def _vocoder(pipe, ds):
    vocoder = getattr(pipe, "vocoder", None)
    if vocoder is not None:
        return vocoder
    from ..pipelines.audio import MelVocoder

    return MelVocoder(**(ds.vocoder or {}))


def summary_line(result: dict) -> str:
    """One line for people: score, conditional accuracy, NFE."""
    parts = [f"{result['dataset']}: {result['score_name']} {result['score']:.4g}"]
    if result.get("score_floor") is not None:
        parts[0] += f" (real-vs-real {result['score_floor']:.3g})"
    if result.get("cond_acc") is not None:
        parts.append(f"cond acc {result['cond_acc']:.3f}")
    if result.get("attribute_acc") is not None:
        parts.append(f"caption pitch and loudness {result['attribute_acc']:.3f} (real "
                     f"{result['attribute_acc_real']:.3f})")
    if result.get("SW2") is not None:
        parts.append(f"SW2 {result['SW2']:.4g}")
    parts.append(f"precision {result['precision']:.3f}, recall {result['recall']:.3f}")
    if result.get("am_depth_ratio") is not None:
        parts.append(f"modulation depth vs data: AM {result['am_depth_ratio']:.2f}, "
                     f"FM {result['fm_depth_ratio']:.2f}")
    parts.append(f"NFE {result['nfe']:g}")
    return ", ".join(parts)
