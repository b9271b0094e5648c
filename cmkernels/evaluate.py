"""The evaluation command line: FD and KID of generated images against a reference set, and the
training of the LeNet feature network. The metrics themselves live in cmkernels.metrics.

    python -m cmkernels.evaluate --generated SAMPLES.npz --reference mnist|twemoji|PATH \\
        [--split train|test|all] [--features lenet|efflite0|inception] [--inception-weights PATH] \\
        [--kid-subset-size N] [--json OUT]
    python -m cmkernels.evaluate train-lenet --out cmkernels/assets/lenet_mnist.pt

The metric is named after its feature space: "FD-LeNet" (1-channel default), "FD-EffLite0"
(3-channel default) and "FID" only with the Inception network. Values in different feature
spaces are not comparable with each other nor with published FIDs.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from pathlib import Path

from cmkernels import cli
from cmkernels.checkpoint import check_writable, save_atomic, write_text_atomic
from cmkernels.data import load_dataset
from cmkernels.metrics import METRIC_NAMES, frechet_distance, train_lenet

BUILTINS = ("mnist", "twemoji")
PROG = "python -m cmkernels.evaluate"


def _evaluate_main(argv: list[str]) -> dict:
    p = cli.ArgumentParser(prog=PROG,
                                description="FD/KID of generated samples against reference images "
                                "(subcommand `train-lenet` trains the digit feature network).")
    p.add_argument("--generated", required=True, help=".npz of uint8 images (key 'images', NHWC)")
    p.add_argument("--reference", required=True, help="mnist | twemoji | folder | .npz | CIFAR dir")
    p.add_argument("--split", default="train", choices=["train", "test", "all"],
                   help="reference split (default train, the set models are trained on)")
    p.add_argument("--features", choices=sorted(METRIC_NAMES),
                   help="default: lenet for 1-channel images, efflite0 for 3-channel")
    p.add_argument("--inception-weights", help="local torch-fidelity Inception-v3 weights (FID)")
    p.add_argument("--kid-subset-size", type=int, help="default min(1000, set sizes)")
    p.add_argument("--kid-subsets", type=int, default=100, help="default 100")
    p.add_argument("--batch-size", type=int, default=250, help="default 250")
    p.add_argument("--device", help="default cuda if available, else cpu")
    p.add_argument("--json", help="also write the result to this JSON file")
    args = p.parse_args(argv)
    for name in ("kid_subset_size", "kid_subsets", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.features == "inception" and not args.inception_weights:
        p.error("--features inception needs --inception-weights PATH (a local torch-fidelity "
                "Inception-v3 file; nothing is downloaded)")
    if args.json:  # fail before the work, not after it
        check_writable(Path(args.json).parent, "--json")

    generated = load_dataset(args.generated, split="all")
    size = generated.resolution if str(args.reference).lower() in BUILTINS else None
    reference = load_dataset(args.reference, split=args.split, image_size=size)
    result = frechet_distance(generated.images, reference.images, args.features,
                              args.batch_size, kid=True, kid_subset_size=args.kid_subset_size,
                              kid_subsets=args.kid_subsets, device=args.device,
                              weights_path=args.inception_weights
                              if args.features == "inception" else None, progress=True)
    result.update(generated=str(args.generated), reference=str(args.reference),
                  reference_split=args.split)
    print(f"{result['metric']}: {result['fd']:.4f}")
    print(f"KID ({result['features']} features): {result['kid_mean']:.6f} ± {result['kid_std']:.6f}"
          f" ({result['kid_subsets']} subsets of {result['kid_subset_size']})")
    print(f"generated: {result['num_a']} images from {args.generated}; reference: "
          f"{result['num_b']} images of {args.reference} ({args.split})")
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return result


def _train_lenet_main(argv: list[str]) -> dict:
    p = cli.ArgumentParser(prog=PROG + " train-lenet",
                                description="Train the LeNet digit feature network on mnist "
                                "'train' (CPU, deterministic) and write weights + a JSON record.")
    p.add_argument("--out", required=True, help="weights .pt (the record goes beside it, .json)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--max-shift", type=int, default=1, help="random-shift augmentation, pixels")
    args = p.parse_args(argv)
    check_writable(Path(args.out).parent, "--out")

    model, record = train_lenet(epochs=args.epochs, seed=args.seed, batch_size=args.batch_size,
                                lr=args.lr, max_shift=args.max_shift, progress=True)
    out = Path(args.out)
    save_atomic(model.state_dict(), out)
    record = {"command": "python -m cmkernels.evaluate train-lenet " + shlex.join(argv),
              **record, "weights": out.name,
              "weights_sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
    write_text_atomic(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    print(f"LeNet test accuracy {record['test_accuracy']:.4f} "
          f"(train {record['train_accuracy']:.4f}); wrote {out} and {out.with_suffix('.json')}")
    return record


def main(argv: list[str] | None = None) -> dict:
    """The command line; returns the result. Errors end it with one line and SystemExit(2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-lenet"]:
        return cli.run(PROG + " train-lenet", lambda: _train_lenet_main(argv[1:]), argv)
    return cli.run(PROG, lambda: _evaluate_main(argv), argv)


if __name__ == "__main__":
    main()

