"""Deterministic English sentences for calibration and held-out evaluation, generated offline.

Templates over small word lists, drawn with a seeded generator; `calibration_and_heldout` returns
two disjoint lists (no sentence in both), the same on every run.
"""

from __future__ import annotations

import random

SUBJECTS = [
    "the old farmer", "my younger sister", "a tired nurse", "the city council", "our new neighbour",
    "the small startup", "a curious student", "the museum guide", "every engineer", "the local baker",
    "a famous novelist", "the football coach", "the night train", "her grandfather", "the research team",
    "a quiet librarian", "the delivery driver", "the mayor", "an anxious traveller", "the orchestra",
    "Maria", "Dr. Okafor", "the twins", "a retired pilot", "the software company", "my landlord",
    "the volunteer firefighters", "Professor Lindqvist", "a stray cat", "the hotel manager", "Grandma Rose",
]
NAMES = ["Alice", "Kenji", "Fatima", "Lucas", "Priya", "Tom", "Olga", "Mateo", "Amara", "Henrik", "Mei", "Jonas"]
VERBS = [
    "repaired", "painted", "sold", "described", "forgot", "discovered", "carried", "ordered",
    "photographed", "designed", "borrowed", "cleaned", "measured", "translated", "delivered", "ignored",
    "rebuilt", "inspected", "hid", "returned", "tasted", "criticized", "tested", "assembled", "lost", "signed",
]
OBJECTS = [
    "the broken bicycle", "a wooden table", "the annual report", "an ancient map", "the red umbrella",
    "a bag of apples", "the kitchen window", "an expensive camera", "the garden fence", "a box of letters",
    "the school bus", "a new recipe", "the violin", "an old photograph", "the weather forecast",
    "a cup of coffee", "the software update", "the river bridge", "a jar of honey", "the vaccine trial",
    "the parking garage", "a pair of boots", "the election results", "an unsigned contract", "the telescope",
    "a basket of fish", "the broken printer", "the tax form", "a bouquet of tulips", "the satellite dish",
]
PLACES = [
    "in the village", "near the harbour", "at the train station", "behind the library", "in a crowded market",
    "on the mountain road", "at the hospital", "in the quiet suburb", "by the lake", "downtown",
    "in Nairobi", "outside the stadium", "at the airport", "in a small apartment", "under the old oak tree",
    "in the laboratory", "across the border", "on the ferry",
]
TIMES = [
    "yesterday", "last winter", "early this morning", "after the storm", "before lunch", "on Sunday",
    "during the festival", "late at night", "last year", "every spring", "in 1987", "three weeks ago",
    "at dawn", "since the pandemic", "on her birthday", "twice a month",
]
ADJECTIVES = [
    "surprising", "boring", "useful", "strange", "beautiful", "difficult", "cheap", "dangerous", "delicious", "noisy",
    "controversial", "fragile", "outdated", "remarkable", "confusing", "affordable", "exhausting", "harmless",
]
TOPICS = [
    "climate change", "the housing market", "machine learning", "public transport", "ancient history",
    "healthy cooking", "space exploration", "renewable energy", "classical music", "online privacy",
    "the stock market", "mountain hiking", "children's education", "modern architecture",
    "quantum computing", "urban gardening", "the Roman empire", "electric cars", "sleep research",
    "medieval poetry", "ocean pollution", "vaccination policy", "jazz improvisation", "cryptocurrency",
]
TEMPLATES = [
    "{subject} {verb} {object} {place} {time}.",
    "{time}, {subject} {verb} {object}.",
    "Why did {subject} say that {object} was so {adjective}?",
    "I think {topic} is more {adjective} than most people believe.",
    "{subject} wrote a {adjective} article about {topic} {time}.",
    "Nobody expected that {subject} {verb} {object} {place}.",
    "Is it true that {topic} became {adjective} {time}?",
    "According to {subject}, {topic} will be {adjective} for years.",
    "{subject} and {subject2} argued about {topic} {place}.",
    "After {subject} {verb} {object}, everything felt {adjective}.",
    "{name} paid {number} dollars for {object} {place}.",
    "Can you explain {topic} to {name} in {number} minutes?",
    "The report claims that {number} percent of people find {topic} {adjective}.",
    "{name}, please bring {object} to the meeting {time}.",
    "If {subject} had not {verb} {object}, {name} would still be waiting {place}.",
    "My favourite book about {topic} is {adjective} but honest.",
    "We walked {number} kilometres {place} and talked about {topic}.",
    "Warning: {object} is {adjective} and should be handled with care.",
    "{subject} never understood why {name} loved {topic} so much.",
    "How many times has {subject} {verb} {object} {time}?",
    "Scientists say {topic} could change everything within {number} years.",
    "{name} laughed when {subject} {verb} {object}.",
    "The {adjective} truth about {topic}: what {subject} learned {time}.",
    "She asked whether {object} was still {place}, but nobody answered.",
]


def generate(count: int, seed: int) -> list[str]:
    """`count` distinct sentences (capitalized), deterministic for a seed."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < count:
        subject, subject2 = rng.sample(SUBJECTS, 2)
        sentence = rng.choice(TEMPLATES).format(
            subject=subject,
            subject2=subject2,
            verb=rng.choice(VERBS),
            object=rng.choice(OBJECTS),
            place=rng.choice(PLACES),
            time=rng.choice(TIMES),
            adjective=rng.choice(ADJECTIVES),
            topic=rng.choice(TOPICS),
            name=rng.choice(NAMES),
            number=rng.choice([2, 3, 5, 7, 12, 15, 20, 40, 75, 120, 300, 1000]),
        )
        out[sentence[0].upper() + sentence[1:]] = None
    return list(out)


def calibration_and_heldout(calibration: int, heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Two disjoint sentence sets drawn from one stream."""
    sentences = generate(calibration + heldout, seed)
    return sentences[:calibration], sentences[calibration:]
