"""Regenerate the tiny quickstart datasets shipped in rwkvtune/assets/.

    python examples/make_sample_data.py            # writes rwkvtune/assets/sample*.jsonl

The text is templated and highly regular (counting, arithmetic, colours, animal sounds, days,
opposites, small stories) so that even a tiny model trained for a few minutes on CPU shows a
clearly falling loss. Deterministic: the same seed always gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import os
import random

NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
COLORS = {
    "the sky": "blue", "grass": "green", "a banana": "yellow", "snow": "white",
    "coal": "black", "a tomato": "red", "an orange": "orange", "a plum": "purple",
    "a lemon": "yellow", "a leaf": "green", "milk": "white", "a strawberry": "red",
}
SOUNDS = {
    "dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa",
    "pig": "oink", "horse": "neigh", "owl": "hoot", "lion": "roar", "frog": "croak",
}
MOVES = {
    "bird": "fly", "fish": "swim", "horse": "run", "frog": "jump", "snake": "slide",
    "duck": "swim", "rabbit": "hop", "bee": "fly",
}
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "day": "night",
    "old": "new", "wet": "dry", "open": "closed", "happy": "sad", "early": "late",
}
NAMES = ["Tom", "Ana", "Sam", "Mia", "Leo", "Zoe", "Max", "Eva", "Ben", "Ivy"]
THINGS = ["apples", "books", "stones", "cards", "shells", "coins", "pens", "cups"]


def counting(r):
    a = r.randint(0, 40)
    n = r.randint(4, 9)
    return f"Counting up from {a}: " + ", ".join(str(a + i) for i in range(n)) + "."


def arithmetic(r):
    a, b = r.randint(0, 12), r.randint(0, 12)
    op = r.choice(["plus", "minus", "times"])
    if op == "minus" and b > a:
        a, b = b, a
    val = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    return f"{a} {op} {b} is {val}."


def color(r):
    thing = r.choice(sorted(COLORS))
    return f"The color of {thing} is {COLORS[thing]}."


def sound(r):
    animal = r.choice(sorted(SOUNDS))
    return f"A {animal} says {SOUNDS[animal]}."


def move(r):
    animal = r.choice(sorted(MOVES))
    return f"A {animal} can {MOVES[animal]}."


def day(r):
    i = r.randrange(7)
    return f"After {DAYS[i]} comes {DAYS[(i + 1) % 7]}."


def opposite(r):
    w = r.choice(sorted(OPPOSITES))
    return f"The opposite of {w} is {OPPOSITES[w]}."


def number_word(r):
    n = r.randrange(len(NUMBER_WORDS))
    return f"The number {n} is written {NUMBER_WORDS[n]}."


def story(r):
    name, thing = r.choice(NAMES), r.choice(THINGS)
    a, b = r.randint(1, 9), r.randint(1, 9)
    return f"{name} has {a} {thing}. {name} finds {b} more. Now {name} has {a + b} {thing}."


SENTENCES = [counting, arithmetic, color, sound, move, day, opposite, number_word, story]


def text_lines(r, n):
    for _ in range(n):
        k = r.randint(3, 6)
        yield {"text": " ".join(r.choice(SENTENCES)(r) for _ in range(k))}


def qa(r):
    """One (question, answer) pair about the same facts."""
    kind = r.randrange(6)
    if kind == 0:
        a, b = r.randint(0, 12), r.randint(0, 12)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        thing = r.choice(sorted(COLORS))
        return f"What color is {thing}?", f"The color of {thing} is {COLORS[thing]}."
    if kind == 2:
        animal = r.choice(sorted(SOUNDS))
        return f"What does a {animal} say?", f"A {animal} says {SOUNDS[animal]}."
    if kind == 3:
        i = r.randrange(7)
        return f"Which day comes after {DAYS[i]}?", f"After {DAYS[i]} comes {DAYS[(i + 1) % 7]}."
    if kind == 4:
        w = r.choice(sorted(OPPOSITES))
        return f"What is the opposite of {w}?", f"The opposite of {w} is {OPPOSITES[w]}."
    a = r.randint(0, 30)
    return f"Count from {a} to {a + 4}.", ", ".join(str(a + i) for i in range(5)) + "."


def chat_lines(r, n):
    for i in range(n):
        messages = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": "You are a friendly teacher."})
        for _ in range(r.randint(1, 2)):
            q, a = qa(r)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        yield {"messages": messages}


REFUSALS = ["I don't know.", "No.", "Ask someone else.", "Why do you ask?", "I will not say.", "Maybe."]


def preference_lines(r, n):
    """DPO pairs: the chosen reply answers the question, the rejected one dodges it. A toy
    preference a tiny model learns in minutes (answer, don't refuse); held-out pairs ask other
    questions, so the accuracy on them measures the preference, not memory."""
    for _ in range(n):
        q, a = qa(r)
        yield {"prompt": q, "chosen": a, "rejected": r.choice(REFUSALS)}


def sum_prompts(r, n):
    """GRPO prompts: small sums, the answer in a field the exact_match reward reads."""
    for _ in range(n):
        a, b = r.randint(0, 9), r.randint(0, 9)
        yield {"prompt": f"{a} plus {b} is", "answer": str(a + b)}


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default=os.path.join(here, "..", "rwkvtune", "assets"))
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--text-lines", type=int, default=400)
    p.add_argument("--chat-lines", type=int, default=50)
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    r = random.Random(args.seed)
    write_jsonl(os.path.join(args.out_dir, "sample.jsonl"), text_lines(r, args.text_lines))
    write_jsonl(os.path.join(args.out_dir, "sample_chat.jsonl"), chat_lines(r, args.chat_lines))
    write_jsonl(os.path.join(args.out_dir, "sample_preference.jsonl"), preference_lines(r, 240))
    write_jsonl(os.path.join(args.out_dir, "sample_preference_eval.jsonl"), preference_lines(r, 60))
    write_jsonl(os.path.join(args.out_dir, "sample_sums.jsonl"), sum_prompts(r, 64))
    names = ("sample.jsonl", "sample_chat.jsonl", "sample_preference.jsonl", "sample_preference_eval.jsonl",
             "sample_sums.jsonl")
    for name in names:
        path = os.path.join(args.out_dir, name)
        print(f"wrote {os.path.normpath(path)} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
