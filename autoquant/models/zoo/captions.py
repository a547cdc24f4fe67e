"""Captions for the demo model: Fashion-MNIST classes named in varied wording.

Training captions come from ``TRAIN_TEMPLATES``; ``HOLDOUT_TEMPLATES`` are never used in training
and serve to check that the model follows wordings it has not seen. Brightness words ("dark",
"light") describe the image they caption (terciles of the garment's mean intensity), so the text
carries real information beyond the class.
"""

from __future__ import annotations

import random

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle boot")

# Nouns for each class, with the article they take.
NOUNS = {
    0: ["a t-shirt", "a tee", "a t-shirt top"],
    1: ["a pair of trousers", "trousers", "a pair of pants"],
    2: ["a pullover", "a sweater", "a jumper"],
    3: ["a dress", "a summer dress", "a gown"],
    4: ["a coat", "a jacket", "a winter coat"],
    5: ["a sandal", "a pair of sandals", "a summer sandal"],
    6: ["a shirt", "a button-up shirt", "a blouse"],
    7: ["a sneaker", "a trainer", "a running shoe"],
    8: ["a bag", "a handbag", "a purse"],
    9: ["an ankle boot", "a pair of ankle boots", "a short boot"],
}
BRIGHTNESS = {0: "dark", 2: "light"}  # tercile -> adjective (the middle tercile has none)

TRAIN_TEMPLATES = ["{n}", "a photo of {n}", "a picture of {n}", "an image of {n}",
                   "a product photo of {n}", "{n}, studio shot"]
HOLDOUT_TEMPLATES = ["a drawing of {n}", "this is {n}", "a close-up of {n}",
                     "a catalog image of {n}", "{n} on a plain background"]


def _with_adjective(noun: str, adjective: str | None) -> str:
    if not adjective:
        return noun
    for article in ("a pair of ", "an ", "a "):
        if noun.startswith(article):
            if article == "a pair of ":
                return f"a pair of {adjective} {noun[len(article):]}"
            return f"a {adjective} {noun[len(article):]}"
    return f"{adjective} {noun}"


def captions_for(label: int, tercile: int | None = None, templates=TRAIN_TEMPLATES) -> list[str]:
    """Every caption of ``templates`` for a class (and brightness tercile, when given)."""
    adjective = BRIGHTNESS.get(tercile) if tercile is not None else None
    return [t.format(n=_with_adjective(n, adjective)) for n in NOUNS[label] for t in templates]


def all_training_captions() -> list[str]:
    """The unique training captions, in a fixed order (index = row of the text cache)."""
    out: list[str] = []
    for label in range(len(CLASSES)):
        for tercile in (0, 1, 2):
            for c in captions_for(label, tercile):
                if c not in out:
                    out.append(c)
    return out


def holdout_prompts(per_class: int = 2, seed: int = 0) -> list[tuple[str, int]]:
    """(prompt, class) pairs in wordings never used in training."""
    rng = random.Random(seed)
    pairs = []
    for label in range(len(CLASSES)):
        options = captions_for(label, None, HOLDOUT_TEMPLATES)
        for prompt in rng.sample(options, per_class):
            pairs.append((prompt, label))
    return pairs


def class_prompts() -> list[str]:
    """One zero-shot prompt per class for CLIP classification."""
    return [f"a photo of {NOUNS[i][0]}" for i in range(len(CLASSES))]
