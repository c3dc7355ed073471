"""The demo: train the README's CNN with sparse attention on handwritten digits.

scikit-learn's digits (1,797 8x8 images, shipped inside the package, nothing is
downloaded) are upscaled to 32x32 and fed to the README's CNN: a 3x3 conv, a
max-pool to a 16x16 map (256 tokens), EnhancedSparseAttention, a linear head.
One run per pattern plus one with the DENSE layout; then the trained model's
attention is drawn on a real photograph (scikit-image's camera man).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from ._measure import PeakMemory

PATTERN_NAMES = ["random", "strided", "block", "axial", "longformer", "dense"]


def progress(prefix, done, total, extra="", width=28, stream=sys.stdout):
    filled = int(width * done / max(total, 1))
    stream.write(f"\r{prefix} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {extra}")
    if done >= total:
        stream.write("\n")
    stream.flush()


def load_digits_tensors(size=32, seed=0):
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images - 0.5) / 0.5
    images = images.repeat(1, 3, 1, 1)  # the README's CNN takes 3 channels
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(labels))
    return (images[order[:split]], labels[order[:split]]), (images[order[split:]], labels[order[split:]])


def build_model(pattern):
    import torch.nn as nn

    from . import EnhancedSparseAttention

    class CNNWithSparseAttention(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(inplace=True),
                                          nn.MaxPool2d(2))
            self.attention = EnhancedSparseAttention(in_channels=64, out_channels=64, num_heads=8,
                                                     attention_ratio=0.5, sparsity_pattern=pattern)
            self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(),
                                            nn.Linear(64, num_classes))

        def forward(self, x):
            return self.classifier(self.attention(self.features(x)))

    return CNNWithSparseAttention()


def train_one(pattern, train, test, epochs, batch_size, lr, seed):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = build_model(pattern)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    images, labels = train
    steps = (len(labels) + batch_size - 1) // batch_size
    epoch_times = []
    with PeakMemory() as memory:
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(labels))
            start = time.perf_counter()
            for step in range(steps):
                idx = order[step * batch_size:(step + 1) * batch_size]
                loss = F.cross_entropy(model(images[idx]), labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if step % 5 == 0 or step == steps - 1:
                    progress(f"  {pattern.name:10s} epoch {epoch + 1}/{epochs}", step + 1, steps,
                             f"loss {loss.item():.3f}")
            epoch_times.append(time.perf_counter() - start)
        model.eval()
        with torch.no_grad():
            predictions = torch.cat([model(test[0][i:i + 256]).argmax(1)
                                     for i in range(0, len(test[1]), 256)])
    accuracy = (predictions == test[1]).float().mean().item()
    stats = model.attention.get_attention_stats()
    return model, dict(pattern=pattern, accuracy=accuracy, epoch_s=float(np.median(epoch_times)),
                       peak_mb=memory.megabytes, density=1.0 - stats.sparsity, entropy=stats.entropy)


def photograph(size=64):
    import torch
    import torch.nn.functional as F
    from skimage import data

    image = torch.tensor(data.camera(), dtype=torch.float32)[None, None] / 255.0
    image = F.interpolate(image, size=(size, size), mode="area")
    return ((image - 0.5) / 0.5).repeat(1, 3, 1, 1)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sparse_attention demo",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long run on a subset")
    parser.add_argument("--patterns", default=",".join(PATTERN_NAMES),
                        help="comma-separated patterns (default: all five and dense); module:name "
                             "names one of your own (a rule, a builder or a CustomPattern, importable "
                             "from here)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per pattern (default 3)")
    parser.add_argument("--out", default="demo_output", help="folder for the pictures")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import torch

    from . import get_num_threads
    from .custom_layouts import pattern_from_spec
    from .patterns import SparsityPattern
    from .utils import draw_patterns, visualize_attention_patterns

    try:
        patterns = [pattern_from_spec(p.strip(), "--patterns") for p in args.patterns.split(",") if p.strip()]
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    if not patterns:
        parser.error("--patterns: name at least one pattern")
    epochs = args.epochs if args.epochs is not None else (1 if args.quick else 3)
    if epochs < 1:
        parser.error(f"--epochs: expected >= 1, got {epochs}")
    os.makedirs(args.out, exist_ok=True)
    train, test = load_digits_tensors(seed=args.seed)
    if args.quick:
        train = (train[0][:128], train[1][:128])
        test = (test[0][:64], test[1][:64])
    print(f"digits: {len(train[1])} training and {len(test[1])} test images, 32x32 -> a 16x16 map "
          f"(256 tokens); {epochs} epoch(s) per pattern; torch threads {torch.get_num_threads()}, "
          f"kernel threads {get_num_threads()}")
    results, models = [], {}
    for pattern in patterns:
        model, record = train_one(pattern, train, test, epochs, 32, 3e-3, args.seed)
        results.append(record)
        models[pattern] = model

    print()
    print("| pattern | density | test accuracy | time / epoch (s) | peak memory (MB) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['pattern'].name} | {r['density']:.3f} | {r['accuracy'] * 100:.1f}% | "
              f"{r['epoch_s']:.2f} | {r['peak_mb']:.0f} |")

    if args.quick:
        print("(--quick trains a few steps on 128 images: it checks that everything runs; "
              "the accuracies mean nothing yet)")

    written = []
    path = os.path.join(args.out, "layouts.png")
    drawn = [p for p in patterns if p is not SparsityPattern.DENSE]  # the patterns trained, yours included
    draw_patterns(24, 24, patterns=drawn or None, save_path=path)
    written.append(path)
    photo = photograph(32 if args.quick else 64)
    for pattern, model in models.items():
        with torch.no_grad():
            features = model.features(photo)
        path = os.path.join(args.out, f"attention_{pattern.name.lower()}.png")
        visualize_attention_patterns(model.attention, features, heads=[0, 1, 2], save_path=path)
        written.append(path)
    import matplotlib.pyplot as plt

    plt.close("all")
    print("\nwrote:")
    for path in written:
        print(f"  {path}")
    print("(layouts.png: the keys a centre, corner and edge pixel may attend in each pattern; "
          "attention_*.png: the trained model's weights for those pixels on the camera-man "
          "photograph, per head)")
    return results


if __name__ == "__main__":
    main()
