"""The demo task: pull a person's name, age, city and job out of a sentence, as one line of JSON.

Rows are generated from word lists with a seed, so the dataset is reproducible and needs no download.
The base model rarely answers in exactly this format; a few minutes of LoRA on CPU teaches it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FIRST = ["Maria", "James", "Aisha", "Chen", "Lukas", "Sofia", "Omar", "Priya", "Diego", "Hannah", "Kenji", "Fatima",
         "Noah", "Elena", "Kwame", "Ingrid", "Mateo", "Yuki", "Amara", "Pavel", "Leila", "Tom", "Nadia", "Ravi"]
LAST = ["Lopez", "Smith", "Khan", "Wei", "Becker", "Rossi", "Haddad", "Patel", "Silva", "Novak", "Tanaka", "Okafor",
        "Johansson", "Garcia", "Mensah", "Larsen", "Cruz", "Sato", "Diallo", "Ivanov", "Moreau", "Brown", "Costa"]
CITIES = ["Lisbon", "Toronto", "Nairobi", "Osaka", "Berlin", "Lima", "Oslo", "Cairo", "Denver", "Madrid", "Seoul",
          "Dublin", "Accra", "Prague", "Sydney", "Chennai", "Bogota", "Vienna", "Austin", "Porto"]
JOBS = ["nurse", "teacher", "carpenter", "software engineer", "baker", "pilot", "accountant", "chef", "architect",
        "electrician", "journalist", "pharmacist", "photographer", "plumber", "librarian", "dentist", "farmer",
        "mechanic", "translator", "firefighter"]
PATTERNS = [
    "{name}, {age}, works as {a_job} in {city}.",
    "{name} is a {age}-year-old {job} who lives in {city}.",
    "After moving to {city}, {name} found work as {a_job}; {pronoun} is {age} now.",
    "Meet {name}: {age} years old, {job}, based in {city}.",
    "In {city}, {age}-year-old {name} has been {a_job} for years.",
    "{name} ({age}) is employed as {a_job} and calls {city} home.",
    "The {job} {name}, aged {age}, was born and raised in {city}.",
    "Our new neighbour in {city} is {name}, a {age} year old {job}.",
]
INSTRUCTION = "Extract the person's name, age, city and job from the sentence. Reply with JSON only."


def make_row(rng: random.Random) -> dict[str, str]:
    person = {"name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "age": rng.randint(19, 78),
              "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
    a_job = ("an " if person["job"][0] in "aeiou" else "a ") + person["job"]
    sentence = rng.choice(PATTERNS).format(pronoun=rng.choice(["she", "he"]), a_job=a_job, **person)
    return {"instruction": INSTRUCTION, "input": sentence, "output": json.dumps(person)}


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [make_row(rng) for _ in range(n)]


def _worse(person: dict, rng: random.Random) -> str:
    """A reply a user would reject: prose, fenced or broken JSON, a field missing or wrong."""
    kind = rng.randrange(5)
    if kind == 0:
        return f"The person is {person['name']}, {person['age']} years old, a {person['job']} in {person['city']}."
    if kind == 1:
        return "```json\n" + json.dumps(person, indent=2) + "\n```"
    if kind == 2:
        return json.dumps(person)[:-1]  # the closing brace lost
    if kind == 3:
        return json.dumps({k: v for k, v in person.items() if k != rng.choice(list(person))})
    return json.dumps({**person, "age": str(person["age"]), "city": person["city"].lower()})


def make_preference_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """The demo task as preference pairs: the exact JSON line chosen over a plausible worse reply."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        row = make_row(rng)
        rows.append({"instruction": row["instruction"], "input": row["input"], "chosen": row["output"],
                     "rejected": _worse(json.loads(row["output"]), rng)})
    return rows


def make_prompt_rows(n: int, seed: int = 0) -> list[dict]:
    """The demo task as GRPO prompts: the sentence to extract from, and the answer as an object (exact_match
    compares a JSON reply with it by value, so key order and spacing do not matter)."""
    rng = random.Random(seed)
    return [{"prompt": f"{row['instruction']}\n\n{row['input']}", "answer": json.loads(row["output"])}
            for row in (make_row(rng) for _ in range(n))]


def write_dataset(path: str | Path, n: int = 600, seed: int = 0, preference: bool = False,
                  prompts: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make = make_prompt_rows if prompts else make_preference_rows if preference else make_rows
    with path.open("w", encoding="utf-8") as f:
        for row in make(n, seed):
            f.write(json.dumps(row) + "\n")
    return path


if __name__ == "__main__":
    import sys

    if "--preference" in sys.argv:
        print(write_dataset("examples/data/extract_people_pairs.jsonl", preference=True))
    elif "--prompts" in sys.argv:
        print(write_dataset("examples/data/extract_people_prompts.jsonl", prompts=True))
    else:
        print(write_dataset(sys.argv[1] if len(sys.argv) > 1 else "examples/data/extract_people.jsonl"))
