"""Give each SuperNode of a demo deployment its own data, cut from one dataset.

    python deploy/split_dataset.py ../shared/data/ag_news --nodes 3 --out deploy/data

writes ``OUT/node-K/train.jsonl`` for K = 1..N — partition K-1 of the dataset's
train split, cut as ``fedlora simulate`` cuts it (shuffled by ``seed``, then
the ``partition`` settings; ``--set key=value`` as for ``fedlora simulate``),
one ``{"text", "label"}`` object per line with the label's class name — and
``OUT/server/``, a copy of the dataset: its test split is the central
evaluation set, which fixes the classes the nodes' labels are mapped onto.
In a real deployment each node brings its own file instead.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from fedlora.core.config import ConfigError, RunConfig, parse_set_option
from fedlora.learning.data import make_partitioner
from fedlora.learning.tasks.labels import load_splits
from fedlora.strategies import resolve


def split(config: RunConfig, out: Path) -> list[int]:
    """Write the node directories and the server's copy; returns the node sizes."""
    splits = load_splits(config["dataset"], config["text-column"], config["label-column"],
                         config["seed"])
    partitioner = make_partitioner(config, len(splits.train), config["seed"],
                                   splits.partition_by)
    partitioner.dataset = splits.train.shuffle(seed=config["seed"]).flatten_indices()
    sizes = []
    for k in range(config["num-clients"]):
        part = partitioner.load_partition(k)
        node = out / f"node-{k + 1}"
        node.mkdir(parents=True, exist_ok=True)
        with open(node / "train.jsonl", "w") as handle:
            for text, label in zip(part["text"], part["label"]):
                handle.write(json.dumps({"text": text,
                                         "label": splits.label_names[label]}) + "\n")
        sizes.append(len(part))
    source = Path(config["dataset"])
    server = out / "server"
    server.mkdir(parents=True, exist_ok=True)
    for file in sorted(source.iterdir()) if source.is_dir() else [source]:
        if file.is_file():
            shutil.copyfile(file, server / file.name)  # contents only: copies stay writable
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="local dataset file or directory")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        overrides = dict(parse_set_option(item) for item in args.set)
        config = resolve({**overrides, "dataset": str(Path(args.dataset).resolve()),
                          "num-clients": args.nodes, "clients-per-round": args.nodes})
        sizes = split(config, args.out)
    except ConfigError as err:
        print(f"split_dataset: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}/node-1..{args.nodes}: {sizes} examples; {args.out}/server: the dataset")
    return 0


if __name__ == "__main__":
    sys.exit(main())
