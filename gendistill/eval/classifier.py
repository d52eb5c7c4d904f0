"""Domain classifiers: small CNNs trained on a built-in dataset's train split.

They give the offline metrics their features: the penultimate layer is the embedding for
"domain FID" (digits) and "domain FAD" (synthsounds log-mels), and the logits judge conditional
accuracy. ``gendistill train-classifier NAME`` trains one and writes
``gendistill/assets/classifiers/NAME/{model.safetensors,config.json}``; ``load_classifier(NAME)``
loads the shipped one.

- ``digits``: 1×8×8 images in [−1, 1], 10 classes (the digit).
- ``synthsounds``: 1×32×32 normalised log-mels (the dataset's ``x``), 8 classes (the sound
  family, ``Dataset.family``).
"""
from __future__ import annotations

import json
import logging
import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..assets import ASSETS
from .frechet import frechet_distance_of_features

log = logging.getLogger(__name__)

CLASSIFIERS_DIR = ASSETS / "classifiers"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# Per dataset: the architecture and the training recipe. The target is ``y`` (class labels) or
# ``family`` (synthsounds' sound family of each caption).
RECIPES = {
    "digits": dict(target="y", channels=[32, 64], feature_dim=64, epochs=40, batch_size=64,
                   lr=2e-3, max_shift=1, noise_std=0.1, time_shift=0, pool="max", final_pool=2,
                   norm=False),
    "synthsounds": dict(target="family", channels=[16, 32, 64], feature_dim=64, epochs=40,
                        batch_size=64, lr=2e-3, max_shift=0, noise_std=0.1, time_shift=4,
                        pool="max", final_pool=4, norm=True),
}


class DomainClassifier(nn.Module):
    """Conv blocks (two 3×3 convs [+ BatchNorm] + ReLU, then a 2×2 max- or average-pool) per
    level, an adaptive average pool to ``final_pool``², a hidden linear layer of ``feature_dim``
    units (the penultimate features, after ReLU) and a linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels=(32, 64),
                 feature_dim: int = 64, dropout: float = 0.2, pool: str = "max",
                 final_pool: int = 2, norm: bool = False):
        super().__init__()
        layers, c_in = [], in_channels
        pool_layer = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}[pool]
        for c in channels:
            for k in range(2):
                layers += [nn.Conv2d(c_in if k == 0 else c, c, 3, padding=1)]
                layers += [nn.BatchNorm2d(c), nn.ReLU()] if norm else [nn.ReLU()]
            layers.append(pool_layer(2))
            c_in = c
        self.conv = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(final_pool), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(c_in * final_pool ** 2, feature_dim), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)
        self.num_features = feature_dim
        self.num_classes = num_classes
        self.config: dict = {}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) model-space inputs -> (B, feature_dim) penultimate features."""
        return self.feature_maps(x)[-1]

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each level's pooled (B, C, H, W) map and the (B, feature_dim) features: what a
        discriminator's heads read (CTM judges samples through a pretrained classifier)."""
        maps, h = [], x.float()
        for layer in self.conv:
            h = layer(h)
            if isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
                maps.append(h)
        return maps + [self.hidden(h)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes)."""
        return self.head(self.dropout(self.features(x)))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted class of each input, in eval mode, batched."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        preds = [self(x[i:i + batch_size].to(device)).argmax(1).cpu()
                 for i in range(0, len(x), batch_size)]
        self.train(was_training)
        return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


class ClassifierFeatures(nn.Module):
    """The penultimate features as a feature module for torchmetrics' FID (``num_features`` is
    read by ``FrechetInceptionDistance(feature=...)``); never trains."""

    def __init__(self, classifier: DomainClassifier):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.num_features

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)


def classifier_dir(name: str) -> Path:
    return CLASSIFIERS_DIR / name


def _targets(ds, target: str) -> torch.Tensor:
    t = getattr(ds, target)
    if t is None:
        raise ValueError(f"dataset {ds.name} has no {target!r} to train a classifier on")
    return t.long()


def _augment(x: torch.Tensor, recipe: dict, g: torch.Generator) -> torch.Tensor:
    """Small shifts (image: both axes; log-mel: time axis only), a loudness offset for
    log-mels, and Gaussian noise, so the classifier also judges imperfect generated samples."""
    b = x.shape[0]
    if recipe["max_shift"]:
        s = recipe["max_shift"]
        padded = F.pad(x, (s, s, s, s), value=-1.0)
        dx, dy = torch.randint(0, 2 * s + 1, (2,), generator=g).tolist()
        x = padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]
    if recipe["time_shift"]:
        shift = int(torch.randint(-recipe["time_shift"], recipe["time_shift"] + 1, (1,),
                                  generator=g))
        x = torch.roll(x, shift, dims=-1)
        x = x + 0.1 * torch.randn(b, 1, 1, 1, generator=g)
    return x + recipe["noise_std"] * torch.rand(b, 1, 1, 1, generator=g) * \
        torch.randn(x.shape, generator=g)


def accuracy(classifier: DomainClassifier, x: torch.Tensor, targets: torch.Tensor) -> float:
    return float((classifier.predict(x) == targets.cpu()).float().mean())


def train_classifier(name: str, out_dir: str | Path | None = None, epochs: int | None = None,
                     seed: int = 0, progress: bool = True, **recipe_overrides) -> Path:
    """Train the domain classifier of a built-in dataset on its train split, measure it on the
    test split, and save ``model.safetensors`` + ``config.json`` (with the accuracies) to
    ``out_dir`` (default: the shipped asset folder). Returns the folder."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ..data import load_dataset

    if name not in RECIPES:
        raise ValueError(f"no domain classifier recipe for {name!r}; choose one of "
                         f"{', '.join(RECIPES)}")
    recipe = dict(RECIPES[name])
    unknown = set(recipe_overrides) - set(recipe)
    if unknown:
        raise ValueError(f"unknown classifier recipe keys: {', '.join(sorted(unknown))}")
    recipe.update(recipe_overrides)
    if epochs is not None:
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        recipe["epochs"] = epochs
    start = time.time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train, test = load_dataset(name, "train"), load_dataset(name, "test")
    x, y = train.x.float(), _targets(train, recipe["target"])
    num_classes = len(train.class_names) if train.class_names else int(y.max()) + 1
    model = DomainClassifier(x.shape[1], num_classes, recipe["channels"], recipe["feature_dim"],
                             pool=recipe["pool"], final_pool=recipe["final_pool"],
                             norm=recipe["norm"])
    opt = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
    steps_per_epoch = (len(x) + recipe["batch_size"] - 1) // recipe["batch_size"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"],
                                                total_steps=recipe["epochs"] * steps_per_epoch)
    model.train()
    bar = tqdm(range(recipe["epochs"]), desc=f"classifier {name}", disable=not progress)
    for _epoch in bar:
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), recipe["batch_size"]):
            idx = perm[i:i + recipe["batch_size"]]
            loss = F.cross_entropy(model(_augment(x[idx], recipe, g)), y[idx],
                                   label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{total / len(x):.4f}")
    model.eval()
    train_acc = accuracy(model, x, y)
    test_acc = accuracy(model, test.x, _targets(test, recipe["target"]))
    with torch.no_grad():  # the domain FID / FAD of real test vs real train: a perfect model's
        floor = frechet_distance_of_features(model.features(test.x), model.features(x))
    config = {
        "name": name, "dataset": name, "target": recipe["target"],
        "input_shape": list(x.shape[1:]), "num_classes": num_classes,
        "class_names": list(train.class_names or map(str, range(num_classes))),
        "channels": list(recipe["channels"]), "feature_dim": recipe["feature_dim"],
        "pool": recipe["pool"], "final_pool": recipe["final_pool"], "norm": recipe["norm"],
        "recipe": recipe, "seed": seed, "train_accuracy": round(train_acc, 4),
        "test_accuracy": round(test_acc, 4),
        "frechet_test_vs_train": round(floor, 6), "train_seconds": round(time.time() - start, 1),
        "command": f"gendistill train-classifier {name}",
    }
    out = Path(out_dir) if out_dir is not None else classifier_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME))
    (out / WEIGHTS_NAME).chmod(0o644)  # safetensors writes 0600; the asset ships in the package
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    log.info("classifier %s: train accuracy %.4f, test accuracy %.4f", name, train_acc, test_acc)
    if out_dir is None:
        load_classifier.cache_clear()
    return out


def load_classifier_from(folder: str | Path) -> DomainClassifier:
    """A classifier folder written by ``train_classifier`` (eval mode, frozen)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"no domain classifier at {folder} (needs {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME})")
    cfg = json.loads(cfg_path.read_text())
    missing = [k for k in ("input_shape", "num_classes", "channels", "feature_dim") if k not in cfg]
    if missing:
        raise ValueError(f"{cfg_path} has no {', '.join(missing)}: not a classifier folder of "
                         f"`gendistill train-classifier`")
    model = DomainClassifier(cfg["input_shape"][0], cfg["num_classes"], cfg["channels"],
                             cfg["feature_dim"], pool=cfg.get("pool", "max"),
                             final_pool=cfg.get("final_pool", 2), norm=cfg.get("norm", False))
    model.load_state_dict(load_file(str(weights)))
    model.config = cfg
    return model.eval().requires_grad_(False)


@lru_cache(maxsize=4)
def load_classifier(name: str) -> DomainClassifier:
    """The shipped domain classifier of a built-in dataset (``digits``, ``synthsounds``)."""
    if name not in RECIPES:
        raise ValueError(f"no domain classifier for {name!r}; there are: {', '.join(RECIPES)}")
    folder = classifier_dir(name)
    if not (folder / WEIGHTS_NAME).is_file() or not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"no domain classifier for {name!r} at {folder}; make it with "
                                f"`gendistill train-classifier {name}`")
    return load_classifier_from(folder)
