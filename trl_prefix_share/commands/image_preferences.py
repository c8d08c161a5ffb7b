"""A small, real-looking image preference set drawn with PIL: charts and shapes, a question, a right and a wrong answer.

Used by the demo's vision variant, the benchmark (`--dataset shapes`) and the tests. Deterministic for a seed. Many
questions repeat word for word over different images ("Which bar is the tallest?"), as in real image preference
sets, so a prompt's identity must include its image. Run it as a script to write the set to disk:

    python -m trl_prefix_share.commands.image_preferences --out shapes_preferences --examples 256
"""

from __future__ import annotations

import argparse
import random
from typing import Any

from datasets import Dataset
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "orange": (240, 150, 30),
    "purple": (140, 60, 180),
    "gray": (120, 120, 120),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (250, 250, 245)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color: tuple) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color, outline=(20, 20, 20))
    elif shape == "square":
        draw.rectangle(box, fill=color, outline=(20, 20, 20))
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color, outline=(20, 20, 20))


def bar_chart(rng: random.Random, size: int) -> tuple[Image.Image, dict[str, Any]]:
    """A bar chart of 3-5 labelled bars; the facts are the tallest and shortest bar's colour."""
    names = rng.sample(sorted(COLORS), rng.randint(3, 5))
    heights = rng.sample(range(2, 10), len(names))
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    width = (size - 8) // len(names)
    for index, (name, height) in enumerate(zip(names, heights, strict=True)):
        x0 = 4 + index * width
        draw.rectangle([x0 + 1, size - 4 - height * (size - 8) // 10, x0 + width - 2, size - 4], fill=COLORS[name])
    draw.line([2, size - 4, size - 2, size - 4], fill=(0, 0, 0))
    tallest = names[heights.index(max(heights))]
    shortest = names[heights.index(min(heights))]
    return image, {"tallest": tallest, "shortest": shortest, "bars": len(names), "colors": names}


def shape_scene(rng: random.Random, size: int) -> tuple[Image.Image, dict[str, Any]]:
    """2-6 coloured shapes; the facts are how many there are of each kind and the largest one's colour."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    count = rng.randint(2, 6)
    shapes, largest, largest_area = [], None, -1
    for _ in range(count):
        shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
        side = rng.randint(size // 8, size // 3)
        x0, y0 = rng.randint(0, size - side - 1), rng.randint(0, size - side - 1)
        _draw_shape(draw, shape, (x0, y0, x0 + side, y0 + side), COLORS[color])
        shapes.append(shape)
        if side * side > largest_area:
            largest, largest_area = (shape, color), side * side
    return image, {"counts": {s: shapes.count(s) for s in SHAPES}, "largest": largest, "total": count}


def _number_words(value: int) -> str:
    return ["no", "one", "two", "three", "four", "five", "six", "seven"][value]


def _wrong(rng: random.Random, right: str, options: list[str]) -> str:
    return rng.choice([option for option in options if option != right])


def make_example(rng: random.Random, size: int) -> dict[str, Any]:
    """One example: an image, a question about it, a correct (chosen) and a wrong (rejected) answer."""
    if rng.random() < 0.5:
        image, facts = bar_chart(rng, size)
        if rng.random() < 0.5:
            question = "Which bar is the tallest in this chart?"
            right = facts["tallest"]
            wrong = _wrong(rng, right, facts["colors"])
            chosen = f"The {right} bar is the tallest."
            rejected = f"The {wrong} bar is the tallest."
        else:
            question = "How many bars does this chart have, and which one is the shortest?"
            chosen = f"It has {_number_words(facts['bars'])} bars; the {facts['shortest']} one is the shortest."
            wrong = _wrong(rng, facts["shortest"], facts["colors"])
            rejected = f"It has {_number_words(facts['bars'] + 1)} bars; the {wrong} one is the shortest."
    else:
        image, facts = shape_scene(rng, size)
        if rng.random() < 0.5:
            shape = rng.choice(SHAPES)
            count = facts["counts"][shape]
            question = f"How many {shape}s are in the picture?"
            chosen = f"There {'is' if count == 1 else 'are'} {_number_words(count)} {shape}{'' if count == 1 else 's'}."
            other = (count + rng.choice([1, 2])) % 7
            rejected = (
                f"There {'is' if other == 1 else 'are'} {_number_words(other)} {shape}{'' if other == 1 else 's'}."
            )
        else:
            shape, color = facts["largest"]
            question = "What colour is the largest shape in the picture?"
            chosen = f"The largest shape is a {color} {shape}."
            rejected = f"The largest shape is a {_wrong(rng, color, sorted(COLORS))} {shape}."
    return {"image": image, "question": question, "chosen": chosen, "rejected": rejected}


def image_preference_dataset(
    num_examples: int = 64,
    seed: int = 0,
    image_size: int = 48,
    conversational: bool = True,
    image_placeholder: str = "<image>",
) -> Dataset:
    """TRL's vision preference format: an ``images`` column (one image each) and ``prompt``/``chosen``/``rejected``,
    as chat messages (``conversational``: the chat template places the image) or as plain text, where the prompt
    starts with the processor's ``image_placeholder`` (e.g. LLaVA's ``<image>``)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_examples):
        example = make_example(rng, image_size)
        if conversational:
            row = {
                "images": [example["image"]],
                "prompt": [{"role": "user", "content": example["question"]}],
                "chosen": [{"role": "assistant", "content": example["chosen"]}],
                "rejected": [{"role": "assistant", "content": example["rejected"]}],
            }
        else:
            row = {
                "images": [example["image"]],
                "prompt": f"{image_placeholder}\n{example['question']}",
                "chosen": " " + example["chosen"],
                "rejected": " " + example["rejected"],
            }
        rows.append(row)
    return Dataset.from_list(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for `datasets.Dataset.save_to_disk`")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--plain", action="store_true", help="plain-text prompts instead of chat messages")
    parser.add_argument("--image-placeholder", default="<image>", help="the processor's image token (plain prompts)")
    args = parser.parse_args(argv)
    dataset = image_preference_dataset(
        args.examples,
        args.seed,
        args.image_size,
        conversational=not args.plain,
        image_placeholder=args.image_placeholder,
    )
    dataset.save_to_disk(args.out)
    print(f"wrote {len(dataset)} image preference examples to {args.out}")


if __name__ == "__main__":
    main()
