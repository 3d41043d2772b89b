"""Cron expressions with an optional seconds field: parse once, ask for the next time.

Where it sits: :mod:`fdship.core.schedules` uses :func:`parse` when a schedule
is added (a bad expression is a 4xx with a sentence) and :meth:`Cron.next_after`
whenever a run fires, to know when the next one is due.  Pure: no clock, no
I/O; times are POSIX seconds and fields are read in UTC, so a schedule means
the same thing on every center whatever its local time zone.

Syntax, the classic five fields or six with seconds first::

    [SECOND] MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK

Each field is ``*``, a value, a range ``a-b``, a step ``*/n`` or ``a-b/n`` or
``a/n`` (from a to the field's end), or a comma-separated list of those.
Months take ``jan``-``dec`` and days of week ``sun``-``sat`` (0 and 7 are both
Sunday), in any case.  ``?`` is accepted for a day field and means ``*``.
Shortcuts: ``@yearly`` (``@annually``), ``@monthly``, ``@weekly``, ``@daily``
(``@midnight``), ``@hourly``.

Like Vixie cron, when both day-of-month and day-of-week are restricted (not
``*``) a day matches if *either* matches; otherwise both must.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fdship.errors import BadRequest

_MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
    start=1)}
_DAYS = {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_MACROS = {"@yearly": "0 0 0 1 1 *", "@annually": "0 0 0 1 1 *", "@monthly": "0 0 0 1 * *",
           "@weekly": "0 0 0 * * 0", "@daily": "0 0 0 * * *", "@midnight": "0 0 0 * * *",
           "@hourly": "0 0 * * * *"}
# (name, low, high, names) of the six fields, seconds first.
_FIELDS = (("second", 0, 59, None), ("minute", 0, 59, None), ("hour", 0, 23, None),
           ("day of month", 1, 31, None), ("month", 1, 12, _MONTHS),
           ("day of week", 0, 7, _DAYS))
# How far ahead next_after looks before deciding an expression never matches.
# 28 years covers every (day, month, weekday) combination the calendar has.
_HORIZON_DAYS = 28 * 366
_UTC = UTC


class CronError(BadRequest):
    """A cron expression that cannot be parsed or never matches."""


@dataclass(frozen=True)
class Cron:
    """A parsed expression: the allowed values of each field."""

    text: str
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday .. 6 = Saturday
    day_star: bool  # day-of-month was '*' (or '?')
    weekday_star: bool

    def _day_ok(self, d: datetime) -> bool:
        dom = d.day in self.days
        dow = (d.isoweekday() % 7) in self.weekdays
        if self.day_star or self.weekday_star:
            return dom and dow
        return dom or dow

    def next_after(self, ts: float) -> float:
        """The first matching whole second strictly after ``ts``.

        Walks the calendar from the largest field down, jumping to the next
        allowed value of each field rather than stepping second by second, so
        a call costs at most a few thousand steps even for rare dates.
        """
        t = datetime.fromtimestamp(int(ts // 1) + 1, tz=_UTC)
        limit = t + timedelta(days=_HORIZON_DAYS)
        while t < limit:
            if t.month not in self.months:
                t = _next_month(t)
                continue
            if not self._day_ok(t):
                t = (t + timedelta(days=1)).replace(hour=0, minute=0, second=0)
                continue
            if t.hour not in self.hours:
                nxt = _next_in(self.hours, t.hour)
                if nxt is None:
                    t = (t + timedelta(days=1)).replace(hour=0, minute=0, second=0)
                else:
                    t = t.replace(hour=nxt, minute=0, second=0)
                continue
            if t.minute not in self.minutes:
                nxt = _next_in(self.minutes, t.minute)
                if nxt is None:
                    t = (t + timedelta(hours=1)).replace(minute=0, second=0)
                else:
                    t = t.replace(minute=nxt, second=0)
                continue
            if t.second not in self.seconds:
                nxt = _next_in(self.seconds, t.second)
                if nxt is None:
                    t = (t + timedelta(minutes=1)).replace(second=0)
                else:
                    t = t.replace(second=nxt)
                continue
            return t.timestamp()
        raise CronError(f"cron expression {self.text!r} never matches a date (within "
                        f"{_HORIZON_DAYS // 366} years); check its day and month fields")


def _next_month(t: datetime) -> datetime:
    if t.month == 12:
        return t.replace(year=t.year + 1, month=1, day=1, hour=0, minute=0, second=0)
    return t.replace(month=t.month + 1, day=1, hour=0, minute=0, second=0)


def _next_in(values: frozenset[int], current: int) -> int | None:
    later = [v for v in values if v > current]
    return min(later) if later else None


def _value(tok: str, name: str, lo: int, hi: int, names: dict[str, int] | None,
           text: str) -> int:
    t = tok.strip().lower()
    if names is not None and t in names:
        return names[t]
    if not t.isdigit():
        extra = ""
        if names is _MONTHS:
            extra = " or a month name (jan-dec)"
        elif names is _DAYS:
            extra = " or a day name (sun-sat)"
        raise CronError(f"cron expression {text!r}: {tok!r} is not a valid {name}; write a "
                        f"number {lo}-{hi}{extra}")
    v = int(t)
    if not lo <= v <= hi:
        raise CronError(f"cron expression {text!r}: {name} {v} is out of range {lo}-{hi}")
    return v


def _field(spec: str, name: str, lo: int, hi: int, names: dict[str, int] | None,
           text: str) -> tuple[frozenset[int], bool]:
    """Allowed values of one field, and whether it was unrestricted ('*')."""
    out: set[int] = set()
    star = False
    if not spec:
        raise CronError(f"cron expression {text!r}: the {name} field is empty")
    for part in spec.split(","):
        if not part:
            raise CronError(f"cron expression {text!r}: empty entry in the {name} field "
                            f"{spec!r} (two commas in a row?)")
        base, slash, step_s = part.partition("/")
        step = 1
        if slash:
            if not step_s.isdigit() or int(step_s) == 0:
                raise CronError(f"cron expression {text!r}: step {step_s!r} in {part!r} must "
                                "be a whole number of at least 1")
            step = int(step_s)
        if base in ("*", "?"):
            if base == "?" and name not in ("day of month", "day of week"):
                raise CronError(f"cron expression {text!r}: '?' is only allowed in the day "
                                "fields")
            a, b = lo, hi
            # Like Vixie cron: a field that starts with '*' (even '*/2') counts
            # as unrestricted when combining day-of-month with day-of-week.
            star = star or spec.startswith(("*", "?"))
        elif "-" in base:
            a_s, _, b_s = base.partition("-")
            a = _value(a_s, name, lo, hi, names, text)
            b = _value(b_s, name, lo, hi, names, text)
            if names is _DAYS and b == 0 and a > 0:
                b = 7  # mon-sun: Sunday as the end of the week
            if a > b:
                raise CronError(f"cron expression {text!r}: range {base!r} of the {name} field "
                                "runs backwards; write the smaller value first")
        else:
            a = _value(base, name, lo, hi, names, text)
            b = hi if slash else a
        out.update(range(a, b + 1, step))
    return frozenset(out), star


def parse(text: str) -> Cron:
    """Parse a 5- or 6-field expression (or an @macro); raise CronError saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise CronError("cron expression is empty; write e.g. \"*/10 * * * *\" (every 10 "
                        "minutes) or \"0 */10 * * * *\" with a seconds field")
    src = text.strip()
    expanded = _MACROS.get(src.lower(), src)
    if expanded.startswith("@"):
        raise CronError(f"cron expression {text!r}: unknown shortcut; known: "
                        + ", ".join(sorted(_MACROS)))
    parts = expanded.split()
    if len(parts) == 5:
        parts = ["0"] + parts
    if len(parts) != 6:
        raise CronError(f"cron expression {text!r} has {len(parts)} fields; write 5 "
                        "(minute hour day month weekday) or 6 (second first)")
    vals = []
    stars = []
    for spec, (name, lo, hi, names) in zip(parts, _FIELDS):
        v, star = _field(spec, name, lo, hi, names, text)
        vals.append(v)
        stars.append(star)
    weekdays = frozenset(d % 7 for d in vals[5])  # 7 is Sunday too
    c = Cron(text=src, seconds=vals[0], minutes=vals[1], hours=vals[2], days=vals[3],
             months=vals[4], weekdays=weekdays, day_star=stars[3], weekday_star=stars[5])
    # Refuse expressions that can never fire (e.g. 30 February) now, not at run time.
    c.next_after(0.0)
    return c
