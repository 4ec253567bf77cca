"""The built-in math corpus: seeded grade-school word problems with worked solutions (GSM8K format).

    generate_problems("train", 1000, seed=0)  ->  [{"question", "answer", "final", "difficulty"}, ...]

`answer` is a step-by-step solution, one explicit equation per line, ending with `#### <number>`:

    Question: Ali has 12 apples. Ali buys 7 more apples. How many apples does Ali have now?
    Answer:   Ali has 12 + 7 = 19 apples now.
              #### 19

It is written for a tiny model to learn in minutes, which shapes every choice:
- every number of the question appears verbatim in the solution, mostly in the order it was read,
  and every intermediate result is re-used verbatim by the next line (copying is easy);
- numbers are small: in one- and two-step problems the first equation is a one-digit fact (a sum
  of two digits, the times tables to 9 x 9, their inverses) and a second one adds, takes or divides
  by one more digit; three- and four-step problems use operands up to 60 and times tables to
  12 x 12; every result has at most three digits and division is exact;
- phrasing is varied but regular: several templates per operation (+, -, *, /, percentages, rates)
  and per difficulty, where difficulty = number of solution lines with an equation (1-4);
- the answer line is always `#### n` with n a non-negative integer.

Splits are disjoint by construction: a question belongs to the split its text hashes to
(`split_of`), and `generate_problems(split)` keeps only its own questions, without duplicates.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path

SPLITS = ("train", "validation", "test")
# a question's split is decided by where its hash falls in [0, 1)
SPLIT_BOUNDS = {"train": (0.0, 0.9), "validation": (0.9, 0.95), "test": (0.95, 1.0)}
DIFFICULTIES = (1, 2, 3, 4)
# the training corpus favours the short problems the demo is judged on
TRAIN_DIFFICULTY_WEIGHTS = {1: 0.4, 2: 0.4, 3: 0.1, 4: 0.1}

NAMES = ("Ali", "Ben", "Cara", "Dan", "Eva", "Finn", "Gia", "Hana", "Ivan", "Jade", "Kofi", "Lena",
         "Maya", "Nils", "Omar", "Pia", "Rosa", "Sam", "Tara", "Uma", "Vik", "Wes", "Yuri", "Zoe",
         "Leo", "Mia", "Noah", "Ines", "Raj", "Ella")
ITEMS = (("apple", "apples"), ("orange", "oranges"), ("pencil", "pencils"), ("sticker", "stickers"),
         ("marble", "marbles"), ("cookie", "cookies"), ("card", "cards"), ("shell", "shells"),
         ("stamp", "stamps"), ("egg", "eggs"), ("balloon", "balloons"), ("candy", "candies"),
         ("flower", "flowers"), ("cupcake", "cupcakes"), ("bead", "beads"), ("crayon", "crayons"),
         ("button", "buttons"), ("lemon", "lemons"), ("plum", "plums"), ("toy car", "toy cars"))
GOODS = (("book", "books"), ("pen", "pens"), ("notebook", "notebooks"), ("ticket", "tickets"),
         ("cap", "caps"), ("mug", "mugs"), ("ball", "balls"), ("kite", "kites"), ("puzzle", "puzzles"),
         ("lamp", "lamps"), ("shirt", "shirts"), ("bag", "bags"), ("toy", "toys"), ("plant", "plants"))
VEHICLES = ("car", "bus", "train", "bike", "truck", "boat")
# p% of a = a / (100 / p): percentages that divide exactly
PERCENTS = {10: 10, 20: 5, 25: 4, 50: 2}


class Story:
    """The random cast of one problem: two distinct names, an item, two goods, a vehicle; `small`
    keeps operands to one digit (difficulties 1-2)."""

    def __init__(self, rng: random.Random, small: bool = False) -> None:
        self.rng, self.small = rng, small
        self.a, self.b = rng.sample(NAMES, 2)
        self.item, self.items = rng.choice(ITEMS)
        (self.good, self.goods), (self.good2, self.goods2) = rng.sample(GOODS, 2)
        self.vehicle = rng.choice(VEHICLES)

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, options):
        return self.rng.choice(options)


Problem = tuple[str, list[str], int]  # question, solution lines, final answer


# ---------------------------------------------------------------------------------------------
# number helpers. With `s.small` (difficulties 1-2) the first equation is a one-digit fact (sums
# of two digits, times tables to 9 x 9 and their inverses), which a tiny model can learn in
# minutes; a second equation combines that result with one more digit. Larger problems use
# operands up to 60 and times tables to 12 x 12. Division is always exact.


def _add_pair(s: Story) -> tuple[int, int]:
    if s.small:
        return s.int(2, 9), s.int(2, 9)
    a = s.int(2, 60)
    return a, s.int(2, min(40, 99 - a))


def _sub_pair(s: Story) -> tuple[int, int]:
    """(a, b) with a - b > 0; small: the inverse of a one-digit sum."""
    if s.small:
        b, c = s.int(2, 9), s.int(1, 9)
        return b + c, b
    a = s.int(10, 99)
    return a, s.int(2, a - 1)


def _mul_pair(s: Story) -> tuple[int, int]:
    hi = 9 if s.small else 12
    return s.int(2, hi), s.int(2, hi)


def _div_pair(s: Story) -> tuple[int, int, int]:
    """(dividend, divisor, quotient); small: the inverse of the times tables to 9 x 9."""
    divisor, quotient = (s.int(2, 9), s.int(2, 9)) if s.small else (s.int(2, 10), s.int(2, 12))
    return divisor * quotient, divisor, quotient


def _percent(s: Story, lo: int = 2, hi: int = 12) -> tuple[int, int, int, int]:
    """(p, whole, k, part): p% of whole = whole / k = part."""
    p = s.choice(tuple(PERCENTS))
    k = PERCENTS[p]
    part = s.int(lo, min(hi, 9) if s.small else hi)
    return p, k * part, k, part


def _speed(s: Story) -> int:
    if s.small:
        return s.int(2, 9)
    return s.choice((s.int(2, 12), 10 * s.int(1, 9)))


def _extra(s: Story, hi: int) -> int:
    """A further amount added or taken away: one digit when small."""
    return s.int(2, 9 if s.small else hi)


# ---------------------------------------------------------------------------------------------
# difficulty 1: one equation


def add_buys(s: Story) -> Problem:
    a, b = _add_pair(s)
    return (f"{s.a} has {a} {s.items}. {s.a} buys {b} more {s.items}. How many {s.items} does {s.a} have now?",
            [f"{s.a} has {a} + {b} = {a + b} {s.items} now."], a + b)


def add_picks(s: Story) -> Problem:
    a, b = _add_pair(s)
    return (f"{s.a} picked {a} {s.items} in the morning and {b} {s.items} in the afternoon. "
            f"How many {s.items} did {s.a} pick in all?",
            [f"{s.a} picked {a} + {b} = {a + b} {s.items} in all."], a + b)


def add_box(s: Story) -> Problem:
    a, b = _add_pair(s)
    return (f"A box holds {a} red {s.items} and {b} blue {s.items}. How many {s.items} are in the box?",
            [f"The box holds {a} + {b} = {a + b} {s.items}."], a + b)


def sub_gives(s: Story) -> Problem:
    a, b = _sub_pair(s)
    return (f"{s.a} has {a} {s.items} and gives {b} {s.items} to {s.b}. How many {s.items} does {s.a} have left?",
            [f"{s.a} has {a} - {b} = {a - b} {s.items} left."], a - b)


def sub_spends(s: Story) -> Problem:
    a, b = _sub_pair(s)
    return (f"{s.a} had {a} dollars and spent {b} dollars on a {s.good}. How many dollars does {s.a} have left?",
            [f"{s.a} has {a} - {b} = {a - b} dollars left."], a - b)


def sub_compare(s: Story) -> Problem:
    a, b = _sub_pair(s)
    return (f"{s.a} has {a} {s.items} and {s.b} has {b} {s.items}. "
            f"How many more {s.items} does {s.a} have than {s.b}?",
            [f"{s.a} has {a} - {b} = {a - b} more {s.items} than {s.b}."], a - b)


def mul_bags(s: Story) -> Problem:
    a, b = _mul_pair(s)
    return (f"{s.a} buys {a} bags of {s.items}. Each bag has {b} {s.items}. How many {s.items} does {s.a} buy?",
            [f"{s.a} buys {a} * {b} = {a * b} {s.items}."], a * b)


def mul_price(s: Story) -> Problem:
    a, b = _mul_pair(s)
    return (f"A {s.good} costs {a} dollars. How many dollars do {b} {s.goods} cost?",
            [f"{b} {s.goods} cost {a} * {b} = {a * b} dollars."], a * b)


def mul_speed(s: Story) -> Problem:
    a, b = _speed(s), s.int(2, 9)
    return (f"{s.a}'s {s.vehicle} travels {a} km each hour. How many km does it travel in {b} hours?",
            [f"It travels {a} * {b} = {a * b} km."], a * b)


def mul_pages(s: Story) -> Problem:
    a, b = _mul_pair(s)
    return (f"{s.a} reads {a} pages a day. How many pages does {s.a} read in {b} days?",
            [f"{s.a} reads {a} * {b} = {a * b} pages."], a * b)


def div_share(s: Story) -> Problem:
    a, b, c = _div_pair(s)
    return (f"{s.a} shares {a} {s.items} equally among {b} friends. How many {s.items} does each friend get?",
            [f"Each friend gets {a} / {b} = {c} {s.items}."], c)


def div_pack(s: Story) -> Problem:
    a, b, c = _div_pair(s)
    return (f"{s.a} puts {a} {s.items} into bags of {b}. How many bags does {s.a} fill?",
            [f"{s.a} fills {a} / {b} = {c} bags."], c)


def div_speed(s: Story) -> Problem:
    a, b, c = _div_pair(s)
    return (f"{s.a}'s {s.vehicle} travels {a} km in {b} hours. How many km does it travel each hour?",
            [f"It travels {a} / {b} = {c} km each hour."], c)


def div_unit_price(s: Story) -> Problem:
    a, b, c = _div_pair(s)
    return (f"{s.a} pays {a} dollars for {b} {s.goods}. How many dollars does one {s.good} cost?",
            [f"One {s.good} costs {a} / {b} = {c} dollars."], c)


def pct_discount(s: Story) -> Problem:
    p, a, k, c = _percent(s)
    return (f"A {s.good} costs {a} dollars. It is on sale for {p}% off. How many dollars is the discount?",
            [f"The discount is {p}% of {a}, which is {a} / {k} = {c} dollars."], c)


def pct_students(s: Story) -> Problem:
    p, a, k, c = _percent(s)
    return (f"There are {a} students in {s.a}'s class. {p}% of them walk to school. How many students walk to school?",
            [f"{p}% of {a} is {a} / {k} = {c} students."], c)


# ---------------------------------------------------------------------------------------------
# difficulty 2: two equations, the second re-using the first result


def change_from_bill(s: Story) -> Problem:
    a, b = _mul_pair(s)
    cost = a * b
    bills = tuple(x for x in (10, 20, 50, 100, 200) if x > cost)
    bill = bills[0] if s.small else s.choice(bills)  # small: the smallest bill that pays
    return (f"{s.a} buys {a} {s.goods} for {b} dollars each and pays with a {bill} dollar bill. "
            f"How many dollars of change does {s.a} get?",
            [f"The {s.goods} cost {a} * {b} = {cost} dollars.",
             f"The change is {bill} - {cost} = {bill - cost} dollars."], bill - cost)


def sale_price(s: Story) -> Problem:
    p, a, k, d = _percent(s)
    return (f"A {s.good} costs {a} dollars. It is on sale for {p}% off. What is the sale price in dollars?",
            [f"The discount is {p}% of {a}, which is {a} / {k} = {d} dollars.",
             f"The sale price is {a} - {d} = {a - d} dollars."], a - d)


def trip_then_more(s: Story) -> Problem:
    a, b, c = _speed(s), s.int(2, 9), _extra(s, 40)
    x = a * b
    return (f"{s.a}'s {s.vehicle} travels at {a} km per hour for {b} hours and then {c} more km. "
            f"How many km does it travel in all?",
            [f"First it travels {a} * {b} = {x} km.", f"In all it travels {x} + {c} = {x + c} km."], x + c)


def boxes_plus_loose(s: Story) -> Problem:
    a, b = _mul_pair(s)
    c, x = _extra(s, 30), a * b
    return (f"{s.a} has {a} boxes with {b} {s.items} in each box and {c} loose {s.items}. "
            f"How many {s.items} does {s.a} have?",
            [f"The boxes hold {a} * {b} = {x} {s.items}.", f"{s.a} has {x} + {c} = {x + c} {s.items}."], x + c)


def share_after_buying(s: Story) -> Problem:
    k, each = (s.int(2, 9), s.int(2, 9)) if s.small else (s.int(2, 10), s.int(2, 12))
    total = k * each
    b = s.int(2, min(9 if s.small else 30, total - 2))
    a = total - b
    return (f"{s.a} has {a} {s.items} and buys {b} more. {s.a} shares them equally among {k} friends. "
            f"How many {s.items} does each friend get?",
            [f"{s.a} has {a} + {b} = {total} {s.items}.", f"Each friend gets {total} / {k} = {each} {s.items}."],
            each)


def percent_rest(s: Story) -> Problem:
    p, a, k, x = _percent(s)
    return (f"There are {a} students in {s.a}'s class. {p}% of them walk to school. "
            f"How many students do not walk to school?",
            [f"{p}% of {a} is {a} / {k} = {x} students.", f"So {a} - {x} = {a - x} students do not walk."], a - x)


def wage_then_spend(s: Story) -> Problem:
    a, b = _mul_pair(s)
    x = a * b
    c = s.int(1, min(9, x - 1) if s.small else x - 1)
    return (f"{s.a} earns {a} dollars an hour and works {b} hours. Then {s.a} spends {c} dollars. "
            f"How many dollars does {s.a} have left?",
            [f"{s.a} earns {a} * {b} = {x} dollars.", f"{s.a} has {x} - {c} = {x - c} dollars left."], x - c)


def more_than_together(s: Story) -> Problem:
    a, b = _add_pair(s)
    x = a + b
    return (f"{s.a} has {a} {s.items}. {s.b} has {b} more {s.items} than {s.a}. "
            f"How many {s.items} do they have together?",
            [f"{s.b} has {a} + {b} = {x} {s.items}.", f"Together they have {a} + {x} = {a + x} {s.items}."], a + x)


def times_as_many_together(s: Story) -> Problem:
    a, b = s.int(2, 9 if s.small else 12), s.int(2, 5)
    x = a * b
    return (f"{s.a} has {a} {s.items}. {s.b} has {b} times as many {s.items} as {s.a}. "
            f"How many {s.items} do they have together?",
            [f"{s.b} has {a} * {b} = {x} {s.items}.", f"Together they have {a} + {x} = {a + x} {s.items}."], a + x)


# ---------------------------------------------------------------------------------------------
# a story of gains and losses, any length: difficulties 2, 3, 4

GAINS = (("buys {b} more {items}", "After buying more, {a} has {x} + {b} = {y} {items}."),
         ("finds {b} more {items}", "After finding more, {a} has {x} + {b} = {y} {items}."),
         ("gets {b} {items} from {other}", "After getting some from {other}, {a} has {x} + {b} = {y} {items}."))
LOSSES = (("gives {b} {items} to {other}", "After giving some to {other}, {a} has {x} - {b} = {y} {items}."),
          ("loses {b} {items}", "After losing some, {a} has {x} - {b} = {y} {items}."),
          ("sells {b} {items}", "After selling some, {a} has {x} - {b} = {y} {items}."),
          ("uses {b} {items}", "After using some, {a} has {x} - {b} = {y} {items}."))


def gains_and_losses(s: Story, steps: int) -> Problem:
    x, cap = (s.int(5, 20), 9) if s.small else (s.int(10, 60), 30)
    sentences, lines = [f"{s.a} has {x} {s.items}."], []
    for i in range(steps):
        lose = x > 120 or (x > 12 and s.rng.random() < 0.5)
        b = s.int(2, min(cap, x - 2)) if lose else s.int(2, min(cap, 150 - x))
        event, line = s.choice(LOSSES if lose else GAINS)
        y = x - b if lose else x + b
        fill = dict(a=s.a, other=s.b, items=s.items, b=b, x=x, y=y)
        sentences.append(("Then " if i else "") + s.a + " " + event.format(**fill) + ".")
        lines.append(line.format(**fill))
        x = y
    sentences.append(f"How many {s.items} does {s.a} have now?")
    return " ".join(sentences), lines, x


# ---------------------------------------------------------------------------------------------
# difficulty 3


def two_purchases(s: Story) -> Problem:
    (a, b), (c, d) = _mul_pair(s), _mul_pair(s)
    x, y = a * b, c * d
    return (f"{s.a} buys {a} {s.goods} at {b} dollars each and {c} {s.goods2} at {d} dollars each. "
            f"How many dollars does {s.a} spend?",
            [f"The {s.goods} cost {a} * {b} = {x} dollars.", f"The {s.goods2} cost {c} * {d} = {y} dollars.",
             f"{s.a} spends {x} + {y} = {x + y} dollars."], x + y)


def two_leg_trip(s: Story) -> Problem:
    a, b, c, d = _speed(s), s.int(2, 5), _speed(s), s.int(2, 5)
    x, y = a * b, c * d
    return (f"{s.a}'s {s.vehicle} travels at {a} km per hour for {b} hours, then at {c} km per hour for {d} hours. "
            f"How many km does it travel in all?",
            [f"First it travels {a} * {b} = {x} km.", f"Then it travels {c} * {d} = {y} km.",
             f"In all it travels {x} + {y} = {x + y} km."], x + y)


def sale_quantity(s: Story) -> Problem:
    p, a, k, d = _percent(s)
    n, price = s.int(2, 6), a - d
    return (f"A {s.good} costs {a} dollars and is on sale for {p}% off. {s.a} buys {n} {s.goods} at the sale price. "
            f"How many dollars does {s.a} pay?",
            [f"The discount is {p}% of {a}, which is {a} / {k} = {d} dollars.",
             f"The sale price is {a} - {d} = {price} dollars.", f"{s.a} pays {price} * {n} = {price * n} dollars."],
            price * n)


def savings_two_buys(s: Story) -> Problem:
    a, b = _mul_pair(s)
    x = a * b
    c = s.int(1, x // 2)
    d = s.int(1, x - c - 1)
    y = x - c
    return (f"{s.a} saves {a} dollars each week for {b} weeks. Then {s.a} spends {c} dollars on a {s.good} "
            f"and {d} dollars on a {s.good2}. How many dollars does {s.a} have left?",
            [f"{s.a} saves {a} * {b} = {x} dollars.", f"After the {s.good}, {s.a} has {x} - {c} = {y} dollars.",
             f"After the {s.good2}, {s.a} has {y} - {d} = {y - d} dollars."], y - d)


def boxes_give_share(s: Story) -> Problem:
    k, each = s.int(2, 6), s.int(2, 10)
    rest = k * each
    a = s.int(2, 10)
    # a boxes of b items, c given away, the rest shared by k friends: a * b = rest + c
    b = -(-(rest + 2) // a)
    c = a * b - rest
    x = a * b
    return (f"{s.a} has {a} boxes of {b} {s.items}. {s.a} gives {c} {s.items} to {s.b} and shares the rest "
            f"equally among {k} friends. How many {s.items} does each friend get?",
            [f"{s.a} has {a} * {b} = {x} {s.items}.", f"After giving some to {s.b}, {x} - {c} = {rest} {s.items} are left.",
             f"Each friend gets {rest} / {k} = {each} {s.items}."], each)


# ---------------------------------------------------------------------------------------------
# difficulty 4


def purchases_change(s: Story) -> Problem:
    (a, b), (c, d) = (s.int(2, 6), s.int(2, 12)), (s.int(2, 6), s.int(2, 12))
    x, y = a * b, c * d
    bill = s.choice(tuple(v for v in (50, 100, 200) if v > x + y))
    return (f"{s.a} buys {a} {s.goods} at {b} dollars each and {c} {s.goods2} at {d} dollars each. "
            f"{s.a} pays with a {bill} dollar bill. How many dollars of change does {s.a} get?",
            [f"The {s.goods} cost {a} * {b} = {x} dollars.", f"The {s.goods2} cost {c} * {d} = {y} dollars.",
             f"Together they cost {x} + {y} = {x + y} dollars.", f"The change is {bill} - {x + y} = {bill - x - y} dollars."],
            bill - x - y)


def trip_remaining(s: Story) -> Problem:
    a, b, c, d = _speed(s), s.int(2, 4), _speed(s), s.int(2, 4)
    x, y = a * b, c * d
    total = x + y + s.int(5, 200)
    return (f"A trip is {total} km long. {s.a}'s {s.vehicle} travels at {a} km per hour for {b} hours, "
            f"then at {c} km per hour for {d} hours. How many km of the trip are left?",
            [f"First it travels {a} * {b} = {x} km.", f"Then it travels {c} * {d} = {y} km.",
             f"In all it travels {x} + {y} = {x + y} km.", f"The trip has {total} - {x + y} = {total - x - y} km left."],
            total - x - y)


def sale_change(s: Story) -> Problem:
    p, a, k, d = _percent(s, hi=8)
    n, price = s.int(2, 5), a - d
    bill = s.choice(tuple(v for v in (50, 100, 200, 500) if v > price * n))
    return (f"A {s.good} costs {a} dollars and is on sale for {p}% off. {s.a} buys {n} {s.goods} at the sale price "
            f"and pays with a {bill} dollar bill. How many dollars of change does {s.a} get?",
            [f"The discount is {p}% of {a}, which is {a} / {k} = {d} dollars.",
             f"The sale price is {a} - {d} = {price} dollars.", f"{s.a} pays {price} * {n} = {price * n} dollars.",
             f"The change is {bill} - {price * n} = {bill - price * n} dollars."], bill - price * n)


def wage_spend_share(s: Story) -> Problem:
    a, b, e, k = s.int(2, 12), s.int(2, 9), s.int(5, 30), s.int(2, 5)
    x = a * b
    y = x + e
    # spend what makes the rest divide evenly among k friends
    most = (y - 1) // k
    each = s.int(max(1, most // 2), most)
    rest, spend = k * each, y - k * each
    return (f"{s.a} earns {a} dollars an hour for {b} hours and gets a {e} dollar tip. "
            f"{s.a} spends {spend} dollars and shares the rest equally among {k} friends. "
            f"How many dollars does each friend get?",
            [f"{s.a} earns {a} * {b} = {x} dollars.", f"With the tip {s.a} has {x} + {e} = {y} dollars.",
             f"After spending, {s.a} has {y} - {spend} = {rest} dollars.",
             f"Each friend gets {rest} / {k} = {each} dollars."], each)


TEMPLATES: dict[int, tuple[Callable[[Story], Problem], ...]] = {
    1: (add_buys, add_picks, add_box, sub_gives, sub_spends, sub_compare, mul_bags, mul_price, mul_speed,
        mul_pages, div_share, div_pack, div_speed, div_unit_price, pct_discount, pct_students),
    2: (change_from_bill, sale_price, trip_then_more, boxes_plus_loose, share_after_buying, percent_rest,
        wage_then_spend, more_than_together, times_as_many_together, lambda s: gains_and_losses(s, 2)),
    3: (two_purchases, two_leg_trip, sale_quantity, savings_two_buys, boxes_give_share,
        lambda s: gains_and_losses(s, 3)),
    4: (purchases_change, trip_remaining, sale_change, wage_spend_share, lambda s: gains_and_losses(s, 4)),
}


# ---------------------------------------------------------------------------------------------
# splits and generation


def split_of(question: str) -> str:
    """The split a question belongs to, from the hash of its text."""
    h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") / 2**64
    for split, (lo, hi) in SPLIT_BOUNDS.items():
        if lo <= h < hi:
            return split
    return "test"


def format_answer(lines: list[str], final: int) -> str:
    return "\n".join(lines) + f"\n#### {final}"


def make_problem(rng: random.Random, difficulty: int) -> dict:
    template = rng.choice(TEMPLATES[difficulty])
    question, lines, final = template(Story(rng, small=difficulty <= 2))
    return {"question": question, "answer": format_answer(lines, final), "final": str(final),
            "difficulty": difficulty}


def generate_problems(split: str, n: int, seed: int = 0, difficulties: Iterable[int] = DIFFICULTIES,
                      difficulty_weights: dict[int, float] | None = None) -> list[dict]:
    """`n` distinct problems of `split`, a pure function of (split, n, seed, difficulties, weights).

    Difficulties cycle in equal shares, or follow `difficulty_weights` ({difficulty: weight}).
    Each problem: {"question", "answer" (steps + "#### n"), "final" (str), "difficulty" (int)}.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    difficulties = tuple(difficulties)
    for d in difficulties:
        if d not in TEMPLATES:
            raise ValueError(f"unknown difficulty {d!r} (known: {', '.join(map(str, TEMPLATES))})")
    if not difficulties:
        raise ValueError("difficulties is empty")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"polyglu-math/{seed}/{split}")
    if difficulty_weights is None:
        plan = [difficulties[i % len(difficulties)] for i in range(n)]
    else:
        weights = [float(difficulty_weights.get(d, 0.0)) for d in difficulties]
        if sum(weights) <= 0:
            raise ValueError(f"difficulty_weights {difficulty_weights} give no weight to {difficulties}")
        plan = rng.choices(difficulties, weights=weights, k=n)
    problems, seen = [], set()
    for difficulty in plan:
        for _attempt in range(10_000):
            problem = make_problem(rng, difficulty)
            q = problem["question"]
            if q not in seen and split_of(q) == split:
                seen.add(q)
                problems.append(problem)
                break
        else:  # pragma: no cover - the space of questions is vast
            raise ValueError(f"cannot find {n} distinct {split} problems of difficulty {difficulty}")
    return problems


def pretraining_text(problem: dict) -> str:
    """One pre-training document: the question and its worked answer."""
    return f"Question: {problem['question']}\nAnswer: {problem['answer']}"


def chat_messages(problem: dict) -> list[dict]:
    return [{"role": "user", "content": problem["question"]}, {"role": "assistant", "content": problem["answer"]}]


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    from polyglu.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_builtin_math(out_dir: str | Path, n_train: int = 50_000, n_val: int = 1_000, n_test: int = 1_000,
                       seed: int = 0) -> dict[str, Path]:
    """Write the built-in math corpus to `out_dir`; returns {name: path}:

    pretrain_train / pretrain_validation   JSONL {"text"}: "Question: ...\\nAnswer: ...\\n#### n"
    sft_train / sft_validation             JSONL {"messages": [user, assistant], "difficulty"}
    test                                   JSONL {"question", "answer", "final", "difficulty"}

    Train problems lean to difficulties 1-2 (`TRAIN_DIFFICULTY_WEIGHTS`); validation and test hold
    equal shares of 1-4, so exact match can be reported per difficulty.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = generate_problems("train", n_train, seed, difficulty_weights=TRAIN_DIFFICULTY_WEIGHTS)
    validation = generate_problems("validation", n_val, seed)
    test = generate_problems("test", n_test, seed)
    paths = {name: out_dir / f"{name}.jsonl" for name in
             ("pretrain_train", "pretrain_validation", "sft_train", "sft_validation", "test")}
    _write_jsonl(paths["pretrain_train"], ({"text": pretraining_text(p)} for p in train))
    _write_jsonl(paths["pretrain_validation"], ({"text": pretraining_text(p)} for p in validation))
    _write_jsonl(paths["sft_train"], ({"messages": chat_messages(p), "difficulty": p["difficulty"]} for p in train))
    _write_jsonl(paths["sft_validation"],
                 ({"messages": chat_messages(p), "difficulty": p["difficulty"]} for p in validation))
    _write_jsonl(paths["test"], test)
    return paths
