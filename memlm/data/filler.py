"""A built-in background text for BABILong: deterministic, unbounded English-ish filler.

BABILong hides bAbI facts in long irrelevant text. When the user gives no corpus,
memlm generates one: sentence k is a pure function of (seed, k), so any
sentence of an endless stream can be produced directly, without generating the
ones before it, and a sample built from it is the same in every process.

The vocabulary is chosen so that the filler cannot help or confuse a bAbI
answer: no word of the bAbI stoplist (names, places, objects, actions, answers)
appears as a whole word, and no filler word contains a qa1-qa5 answer label
as a substring ("gardener" would contain "garden"). Tests check both.
"""

from __future__ import annotations

import re

#: Every entity, answer and action word of bAbI v1.2; the filler never uses them.
BABI_STOPLIST = frozenset(w.lower() for w in """
Mary John Daniel Sandra Bill Fred Jeff Julie Emily Gertrude Winona Jessica Jason Antoine Sumit
Yann Lily Julius Greg Brian Bernhard
bathroom bedroom garden hallway kitchen office park school cinema
apple football milk box chest chocolate chocolates container suitcase pajamas
cat cats mouse mice sheep wolf wolves lion frog swan rhino
gray green white yellow red pink blue
square rectangle sphere triangle
yes no maybe none nothing one two three
north south east west
hungry thirsty tired bored afraid
went moved travelled journeyed picked grabbed took got dropped discarded put left gave handed
passed received
yesterday morning afternoon evening
""".split())

#: Answer labels of qa1-qa5: no filler word may even contain one of them.
QA1_5_LABELS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office",
                "bill", "fred", "jeff", "mary", "apple", "football", "milk")

SUBJECTS = tuple("""
captain sailor merchant scholar weaver baker potter miller carpenter blacksmith tailor poet
painter sculptor astronomer chemist surveyor librarian clerk mayor judge priest farmer fisherman
architect engineer musician novelist historian physician pilgrim traveler courier innkeeper
jeweler cobbler mason glassblower stonecutter cartographer botanist geologist printer violinist
bookbinder locksmith chandler cooper saddler brewer vintner tanner goldsmith harpist
""".split())

ADJECTIVES = tuple("""
ancient quiet narrow distant rusty wooden hollow silent crooked gentle heavy fragile polished
dusty golden silver copper bronze frozen humid brittle sturdy elegant modest curious famous
forgotten hidden broken patient stubborn clever weary noisy tidy ragged vast tiny enormous faint
bright dim shallow steep remote ornate plain marble velvet woolen careful solemn cheerful
weathered gilded chipped faded rugged lacquered tarnished slender graceful peculiar
""".split())

NOUNS = tuple("""
lantern ledger compass violin telescope anchor barrel blanket bucket candle carpet chisel clock
coin cradle drum feather flag flute hammer helmet kettle ladder lamp letter map mirror needle
notebook oar painting parcel pendant pillow pitcher quilt ribbon rope saddle scroll shovel statue
teapot thimble trumpet umbrella vase wagon whistle banner basket bottle bracelet cabinet globe
harp jar locket manuscript medal
sextant hourglass tapestry chalice spindle loom anvil lute goblet inkwell
""".split())

VERBS = tuple("""
polished repaired examined painted measured studied admired borrowed buried cleaned copied
described displayed inspected mended sketched weighed wrapped sold bought found hid built sewed
signed tested traded sorted guarded praised ignored counted restored carved decorated cataloged
photographed auctioned
""".split())

#: where things happen (whole phrases; the nouns in them are content words too)
PLACES = tuple(f"{prep} the {noun}" for prep, noun in (
    ("near", "harbor"), ("beside", "mill"), ("behind", "chapel"), ("at", "market"),
    ("inside", "workshop"), ("under", "bridge"), ("across", "valley"), ("by", "river"),
    ("in", "library"), ("at", "station"), ("in", "courtyard"), ("on", "terrace"),
    ("near", "lighthouse"), ("in", "orchard"), ("beside", "quarry"), ("at", "tavern"),
    ("in", "museum"), ("behind", "cathedral"), ("outside", "village"), ("across", "meadow"),
    ("in", "forest"), ("in", "cellar"), ("in", "attic"), ("behind", "barn"), ("on", "pier"),
    ("along", "canal"), ("atop", "tower"), ("inside", "fortress"), ("near", "monastery"),
    ("in", "plaza"), ("beside", "bakery"), ("inside", "theater"), ("near", "vineyard"),
    ("along", "coast"), ("at", "crossroads"), ("beneath", "cliffs"),
))

TIMES = (
    "at dawn", "before sunrise", "during the winter", "last spring", "at midnight",
    "after the storm", "during the festival", "in the autumn", "at noon", "before the harvest",
    "long ago", "every summer", "on a rainy day", "late at night", "that week", "at dusk",
    "during the long drought", "after the wedding", "before the flood", "in those years",
)

#: sentence shapes; {s} subject, {a}/{b} adjectives, {n}/{m} nouns, {v}/{w} verbs,
#: {p} place phrase, {t} time phrase
TEMPLATES = (
    "The {a} {s} {v} the {b} {n} {p} {t}.",
    "{T}, the {s} {v} a {a} {n} and then {w} the {m}.",
    "According to the {s}, the {a} {n} was never seen {p} again.",
    "It is said that the {s} {v} the {a} {n} {p} {t}.",
    "{P}, a {a} {s} quietly {v} the {b} {n}.",
    "Before the {n} became {a}, the {s} {v} it {p}.",
    "The {s} who {v} the {n} {t} later {w} a {a} {m}.",
    "Some believe the {a} {n} was {v} by a {s} {p}, though the records are unclear.",
    "{T}, the {s} and the {r} {v} the {a} {n} {p}.",
    "Although the {n} seemed {a}, the {s} {v} it with great care.",
    "Nobody could explain why the {a} {s} {v} the {n} {t}.",
    "The {a} {m} that the {s} {v} {p} still hangs above the {n}.",
    "Every visitor who saw the {a} {n} {p} praised the {s} for it.",
    "A letter from the {s} describes how the {b} {n} was {v} {t}.",
    "{P}, the {a} {s} once {v} a {n} that nobody else wanted.",
    "Long after the {s} had gone, the {a} {n} remained {p}.",
)


_AN = re.compile(r"\ba ([aeiou])")


def _mix(x: int) -> int:
    """splitmix64: a fast, well-mixed 64-bit hash (the counter-based generator)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def filler_sentence(seed: int, k: int) -> str:
    """Sentence k of the filler stream with this seed (a pure function of both)."""
    state = _mix((seed & 0xFFFFFFFF) << 32 ^ _mix(k))

    def pick(options: tuple[str, ...]) -> str:
        nonlocal state
        state = _mix(state)
        return options[state % len(options)]

    template = pick(TEMPLATES)
    s, r = pick(SUBJECTS), pick(SUBJECTS)
    a, b = pick(ADJECTIVES), pick(ADJECTIVES)
    n, m = pick(NOUNS), pick(NOUNS)
    v, w = pick(VERBS), pick(VERBS)
    p, t = pick(PLACES), pick(TIMES)
    text = template.format(s=s, r=r, a=a, b=b, n=n, m=m, v=v, w=w, p=p, t=t,
                           P=p[0].upper() + p[1:], T=t[0].upper() + t[1:])
    return _AN.sub(r"an \1", text)


def content_words() -> set[str]:
    """Every content word the filler can use (for the vocabulary-size check)."""
    words = set(SUBJECTS) | set(ADJECTIVES) | set(NOUNS) | set(VERBS)
    for phrase in PLACES + TIMES:
        words.update(phrase.split())
    return words - {"the", "a", "at", "in", "on", "by", "of", "near", "before", "after",
                    "during", "every", "that", "those", "under", "across", "inside",
                    "outside", "behind", "beside", "along", "atop", "beneath", "long"}
