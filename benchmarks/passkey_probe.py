"""How far a model's copy circuit has formed: loss on the passkey answer digits of held-out passkey documents.

Chance is ln 10 = 2.30 nats a digit; a model that retrieves gets ~0 and exact answers. Cheaper and more
sensitive than generating (it shows progress long before greedy answers come out right).
Usage: python benchmarks/passkey_probe.py MODEL_DIR [--docs 30] [--seed 7]
"""

import argparse
import random

import torch
import torch.nn.functional as F

from longreach import load_model
from longreach.demo.corpus import passkey_doc
from longreach.model.tokenizer import ByteTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--docs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    tokenizer, model = ByteTokenizer(), load_model(args.model, dtype="fp32")
    rng = random.Random(args.seed)
    total, exact = 0.0, 0
    for _ in range(args.docs):
        ids = torch.tensor(tokenizer.encode(passkey_doc(rng, rng.randint(100, 240))))  # ends "... is 12345."
        with torch.no_grad():
            logits = model(ids)
        losses = F.cross_entropy(logits[:-1], ids[1:], reduction="none")
        total += losses[-6:-1].mean().item()  # the five answer digits
        exact += int(torch.equal(logits[-7:-2].argmax(-1), ids[-6:-1]))
    print(
        f"{args.model}: answer-digit loss {total / args.docs:.2f} nats (chance 2.30), "
        f"exact {exact}/{args.docs}"
    )


if __name__ == "__main__":
    main()
