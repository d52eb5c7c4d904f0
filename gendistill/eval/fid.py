"""FID through torchmetrics' ``FrechetInceptionDistance``.

- **domain FID** (offline default for built-in image data): the Fréchet distance between the
  penultimate features of the dataset's domain classifier (``gendistill.eval.classifier``) on
  real and generated images, as MNIST papers do with LeNet. Not comparable to Inception FID
  and always reported under the name "domain FID".
- **Inception FID** (the standard one) when the user supplies the Inception weights file
  (``feature_extractor_weights_path``; torch-fidelity's ``pt_inception-2015-12-05`` weights,
  needs the ``fid`` extra). Images are converted from model space [−1, 1] to RGB uint8 at
  299×299 (bilinear resize, grey repeated to three channels), the input Inception expects.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .classifier import ClassifierFeatures, DomainClassifier, load_classifier
from .frechet import frechet_distance

DOMAIN_FID = "domain FID"
INCEPTION_FID = "FID"
INCEPTION_SIZE = 299


def _fid_metric_class():
    """torchmetrics' FrechetInceptionDistance (feature extraction, running sums, conversion) with
    the final Fréchet step done by ``frechet_distance``: the same formula, from symmetric
    eigendecompositions (faster and better conditioned than the eigenvalues of Σ₁Σ₂ that
    torchmetrics takes, which cost minutes for 2048-d features on a CPU)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    class FrechetDistanceMetric(FrechetInceptionDistance):
        def compute(self) -> torch.Tensor:
            stats = []
            for side in ("real", "fake"):
                n = getattr(self, f"{side}_features_num_samples")
                if n < 2:
                    raise RuntimeError("FID needs at least 2 real and 2 generated samples")
                total = getattr(self, f"{side}_features_sum").double()
                mean = total / n
                cov = (getattr(self, f"{side}_features_cov_sum").double()
                       - n * torch.outer(mean, mean)) / (n - 1)
                stats += [mean, cov]
            return torch.tensor(frechet_distance(*stats), dtype=torch.float64)

    return FrechetDistanceMetric


def _batches(x: torch.Tensor, batch_size: int):
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size]


def _check_images(x: torch.Tensor, what: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 4 or x.shape[0] < 2:
        raise ValueError(f"{what}: FID needs at least 2 images (N, C, H, W), got "
                         f"{tuple(x.shape)}")
    return x


def _fid_of(metric, real: torch.Tensor, fake: torch.Tensor, batch_size: int,
            convert=lambda b: b) -> float:
    with torch.no_grad():
        for batch in _batches(real, batch_size):
            metric.update(convert(batch), real=True)
        for batch in _batches(fake, batch_size):
            metric.update(convert(batch), real=False)
        return float(metric.compute())


def domain_fid(real: torch.Tensor, fake: torch.Tensor,
               classifier: str | DomainClassifier = "digits", batch_size: int = 512) -> float:
    """Domain FID between real and generated images in model space ([−1, 1], the dataset's
    shape), with the penultimate features of the domain classifier."""
    clf = load_classifier(classifier) if isinstance(classifier, str) else classifier
    real, fake = _check_images(real, "real images"), _check_images(fake, "generated images")
    expected = tuple(clf.config.get("input_shape", real.shape[1:]))
    for what, x in (("real images", real), ("generated images", fake)):
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"{what} have shape {tuple(x.shape[1:])}, the domain classifier "
                             f"expects {expected}")
    metric = _fid_metric_class()(feature=ClassifierFeatures(clf))
    return _fid_of(metric, real.float().cpu(), fake.float().cpu(), batch_size)


def to_inception_input(images: torch.Tensor, value_range=(-1.0, 1.0)) -> torch.Tensor:
    """(N, C, H, W) float images in ``value_range`` (C = 1 or 3) -> (N, 3, 299, 299) uint8.

    Bilinear resize (antialiased when shrinking) in float before quantising, so small images
    are not blocky; grey images are repeated to RGB.
    """
    x = torch.as_tensor(images).float()
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"Inception FID needs (N, 1 or 3, H, W) images, got {tuple(x.shape)}")
    lo, hi = value_range
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                          align_corners=False, antialias=True).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def inception_fid_metric(weights_path: str | Path, feature: int = 2048):
    """torchmetrics' FrechetInceptionDistance with the user's weights; ``feature`` picks the
    Inception layer (2048, the standard pool features; 64 / 192 / 768 for quick checks)."""
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file not found: {path}")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as e:
        raise ImportError("Inception FID needs torch-fidelity: pip install 'gendistill[fid]'") \
            from e
    return _fid_metric_class()(feature=feature, feature_extractor_weights_path=str(path))


def inception_fid(real: torch.Tensor, fake: torch.Tensor, weights_path: str | Path,
                  value_range=(-1.0, 1.0), batch_size: int = 32, feature: int = 2048) -> float:
    """Standard Inception FID between real and generated images (model space by default)."""
    real, fake = _check_images(real, "real images"), _check_images(fake, "generated images")
    metric = inception_fid_metric(weights_path, feature)
    return _fid_of(metric, real.cpu(), fake.cpu(), batch_size,
                   convert=lambda b: to_inception_input(b, value_range))
