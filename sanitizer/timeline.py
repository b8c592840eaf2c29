"""The timeline of one finding's object as inline SVG: one lane per thread, loop or task.

Everything is drawn from what the events carry: the object's creation time
(``created_at``), its transfers and sharing windows (``story``), each violation
occurrence (the summaries' ``occurrences``, else the event's ``timestamp``), the
holder of a call in progress, and the object's last accesses when the
``history=N`` option kept them. A finding merged from several processes is one
object per process: the first event's process is drawn.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from html import escape
from typing import Any

from sanitizer.logs import Finding

# Geometry, in SVG user units (the SVG scales to the page's width).
WIDTH = 960
LABEL_WIDTH = 210
RIGHT_PAD = 24
LANE_HEIGHT = 34
TOP = 14
AXIS_HEIGHT = 34


def parse_time(text: object) -> float | None:
    """Seconds since the epoch of an ISO 8601 timestamp (``Z`` or an offset), or None."""
    if not isinstance(text, str) or not text:
        return None
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def thread_label(info: dict[str, Any] | None) -> str:
    """``T1 'worker'`` for a thread dict of an event."""
    if not isinstance(info, dict):
        return "?"
    serial = info.get("serial")
    name = info.get("name")
    label = f"T{serial}" if isinstance(serial, int) else "T?"
    return f"{label} '{name}'" if name else label


def _task_name(info: object) -> str | None:
    if isinstance(info, dict):
        name = info.get("name")
        return str(name) if name else None
    return str(info) if isinstance(info, str) and info else None


@dataclasses.dataclass
class Mark:
    """One thing drawn on a lane: a point (``end`` None) or an interval."""

    lane: str
    at: float
    kind: str  # the CSS class: created, transfer, violation, holder, holder-mark, access
    tip: str
    end: float | None = None


@dataclasses.dataclass
class Window:
    """A sharing window (shared .. unshared), drawn across every lane."""

    start: float
    end: float | None  # None: still open when the event was written
    tip: str


@dataclasses.dataclass
class Timeline:
    """Lanes (key -> label, in order), marks and windows, before drawing."""

    lanes: dict[str, str] = dataclasses.field(default_factory=dict)
    marks: list[Mark] = dataclasses.field(default_factory=list)
    windows: list[Window] = dataclasses.field(default_factory=list)
    #: Processes other than the drawn one that reported this finding.
    others: int = 0
    #: How the holder's interval was known: "history", "mark", or "" (no holder).
    holder: str = ""

    def lane_of_thread(self, info: dict[str, Any] | None, serial: object = None) -> str:
        if serial is None and isinstance(info, dict):
            serial = info.get("serial")
        key = f"T{serial}" if isinstance(serial, int) else "T?"
        if key not in self.lanes:
            self.lanes[key] = "thread " + (thread_label(info) if isinstance(info, dict)
                                           else key)
        return key

    def lane_of_task(self, name: str) -> str:
        key = f"task:{name}"
        self.lanes.setdefault(key, f"task '{name}'")
        return key

    def lane_of_loop(self, info: dict[str, Any]) -> str:
        serial = info.get("serial")
        key = f"L{serial}" if isinstance(serial, int) else "L?"
        self.lanes.setdefault(key, f"loop {key} ({info.get('type', 'event loop')})")
        return key


def _site_text(site: object) -> str:
    if isinstance(site, dict):
        return f"{site.get('file', '?')}:{site.get('line', '?')} in {site.get('function', '?')}"
    return "?"


def build(finding: Finding) -> Timeline:
    """What to draw for ``finding``: the first event's process only."""
    event = finding.event
    pid, host = event.get("pid"), str(event.get("host", ""))
    line = Timeline()
    line.others = len({p for p in finding.processes if p != (host, pid)})
    threads = {serial: info for (h, p, serial), info in finding.threads.items()
               if (h, p) == (host, pid)}
    owner = event.get("owner_thread")
    transfers = [s for s in event.get("story") or ()
                 if isinstance(s, dict) and s.get("what") == "transfer"]
    # After a transfer owner_thread is the new owner: the maker is the first transfer's
    # previous owner ("from"), where the log has it.
    maker = transfers[0].get("from") if transfers else None
    creator_lane = None
    if isinstance(maker, dict):
        creator_lane = line.lane_of_thread(maker)
    elif transfers:
        creator_lane = "object"
        line.lanes[creator_lane] = "made by (thread not logged: transferred since)"
    owner_lane = line.lane_of_thread(owner)
    # Lanes in the order a reader wants them: the owner, who touched it, the holder.
    accessor = event.get("thread")
    access_lane = line.lane_of_thread(accessor)
    holder = event.get("holder_thread")
    holder_lane = line.lane_of_thread(holder) if isinstance(holder, dict) else None
    for key in ("owner_loop", "loop"):
        info = event.get(key)
        if isinstance(info, dict):
            line.lane_of_loop(info)

    created = parse_time(event.get("created_at"))
    if created is not None:
        made_by = (f" by {thread_label(maker)}" if isinstance(maker, dict)
                   else "" if creator_lane else f" by {thread_label(owner)}")
        line.marks.append(Mark(creator_lane or owner_lane, created, "created",
                               f"created at {event.get('created_at')}{made_by}, "
                               f"{_site_text(event.get('creation_site'))}"))
        owner_loop = event.get("owner_loop")
        if isinstance(owner_loop, dict) and not event.get("bound_stack"):
            line.marks.append(Mark(line.lane_of_loop(owner_loop), created, "created",
                                   f"made under loop L{owner_loop.get('serial')}, "
                                   f"at {event.get('created_at')}"))

    _story(line, event)

    for entry in event.get("history") or ():
        if not isinstance(entry, dict):
            continue
        at = parse_time(entry.get("at"))
        if at is None:
            continue
        lane = line.lane_of_thread(entry.get("thread"))
        line.marks.append(Mark(lane, at, "access",
                               f"access at {entry.get('at')} by "
                               f"{thread_label(entry.get('thread'))}, "
                               f"{_site_text(entry.get('site'))}"))

    # Violations: every occurrence of the drawn process, else the event itself.
    occurrences = [o for o in finding.occurrences
                   if (o.get("host"), o.get("pid")) == (host, pid)]
    violation_times: list[float] = []
    for occurrence in occurrences:
        at = parse_time(occurrence.get("at"))
        if at is None:
            continue
        serial = occurrence.get("thread")
        known = threads.get(serial) if isinstance(serial, int) else None
        task = _task_name(occurrence.get("task"))
        lane = (line.lane_of_task(task) if task
                else line.lane_of_thread(known, serial))
        who = f"task '{task}'" if task else thread_label(known or {"serial": serial})
        violation_times.append(at)
        line.marks.append(Mark(lane, at, "violation",
                               f"{event.get('policy')} violation at {occurrence.get('at')} "
                               f"by {who}, {_site_text(event.get('access_site'))}"))
    stamp = parse_time(event.get("timestamp"))
    if not violation_times and stamp is not None:
        task = _task_name(event.get("task"))
        lane = line.lane_of_task(task) if task else access_lane
        violation_times.append(stamp)
        line.marks.append(Mark(lane, stamp, "violation",
                               f"{event.get('policy')} violation at {event.get('timestamp')} "
                               f"by {thread_label(accessor)}, "
                               f"{_site_text(event.get('access_site'))}"))

    _holder(line, event, holder_lane, violation_times)
    return line


def _story(line: Timeline, event: dict[str, Any]) -> None:
    """Transfers as marks on the new owner's lane; shared..unshared as windows (nested)."""
    depth = 0
    opened: tuple[float, str] | None = None
    for entry in event.get("story") or ():
        if not isinstance(entry, dict):
            continue
        at = parse_time(entry.get("at"))
        if at is None:
            continue
        what = entry.get("what")
        who = thread_label(entry.get("thread"))
        if what == "transfer":
            line.marks.append(Mark(line.lane_of_thread(entry.get("thread")), at, "transfer",
                                   f"transferred to {who} at {entry.get('at')}"))
        elif what == "shared":
            if depth == 0:
                opened = (at, f"shared by {who} from {entry.get('at')}")
            depth += 1
        elif what == "unshared" and depth > 0:
            depth -= 1
            if depth == 0 and opened is not None:
                line.windows.append(Window(opened[0], at,
                                           f"{opened[1]} to {entry.get('at')}"))
                opened = None
    if opened is not None:
        line.windows.append(Window(opened[0], None, f"{opened[1]}, still open"))


def _holder(line: Timeline, event: dict[str, Any], lane: str | None,
            violation_times: list[float]) -> None:
    """The holder's interval: from its last recorded access to the violation."""
    holder_task = _task_name(event.get("holder_task"))
    if lane is None and holder_task:
        lane = line.lane_of_task(holder_task)
    if lane is None or not violation_times:
        return
    # The first occurrence: the event's own (its timestamp is when it was written, later).
    violation = min(violation_times)
    who = line.lanes[lane]
    holder = event.get("holder_thread")
    serial = holder.get("serial") if isinstance(holder, dict) else None
    last = None
    for entry in event.get("history") or ():
        if not isinstance(entry, dict) or not isinstance(entry.get("thread"), dict):
            continue
        when = parse_time(entry.get("at"))
        if entry["thread"].get("serial") == serial and when is not None and when <= violation:
            last = (when, entry)
    if last is not None:
        line.holder = "history"
        line.marks.append(Mark(lane, last[0], "holder",
                               f"{who} held it: inside a call from its last recorded access "
                               f"({last[1].get('at')}, {_site_text(last[1].get('site'))}) "
                               f"to the violation (from the access history)",
                               end=violation))
    else:
        line.holder = "mark"
        line.marks.append(Mark(lane, violation, "holder-mark",
                               f"{who} was inside a call at the violation "
                               f"({_iso(violation)}); when it entered is not known "
                               "(no access history: history=N records it)"))


def _iso(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.isoformat().replace("+00:00", "Z")


# -- drawing ------------------------------------------------------------------------------


def _ticks(span: float) -> float:
    """A round tick step giving about five ticks over ``span`` seconds."""
    raw = span / 5
    power: float = 10.0 ** math.floor(math.log10(raw))
    for step in (1, 2, 5, 10):
        if raw <= step * power:
            return float(step * power)
    return 10.0 * power  # pragma: no cover - the loop always returns


def _duration(seconds: float) -> str:
    if seconds == 0:
        return "0"
    if abs(seconds) < 1e-3:
        return f"+{seconds * 1e6:.0f} µs"
    if abs(seconds) < 1:
        return f"+{seconds * 1e3:.4g} ms"
    return f"+{seconds:.4g} s"


def svg(line: Timeline) -> str:
    """The timeline as an ``<svg>`` element (empty string when there is nothing to draw)."""
    times = [m.at for m in line.marks] + [m.end for m in line.marks if m.end is not None]
    times += [w.start for w in line.windows] + [w.end for w in line.windows if w.end]
    if not times or not line.lanes:
        return ""
    start, stop = min(times), max(times)
    span = stop - start or 1e-3
    left, right = LABEL_WIDTH, WIDTH - RIGHT_PAD

    def x(at: float) -> float:
        return round(left + (at - start) / span * (right - left), 2)

    lanes = list(line.lanes)
    height = TOP + LANE_HEIGHT * len(lanes) + AXIS_HEIGHT
    y_of = {key: TOP + LANE_HEIGHT * i + LANE_HEIGHT / 2 for i, key in enumerate(lanes)}
    bottom = TOP + LANE_HEIGHT * len(lanes)
    out = [f'<svg class="timeline" viewBox="0 0 {WIDTH} {height}" width="100%" '
           f'role="img" aria-label="timeline of the object" '
           f'xmlns="http://www.w3.org/2000/svg">']
    for window in line.windows:
        end = x(window.end) if window.end is not None else right
        out.append(f'<rect class="shared-window" x="{x(window.start)}" y="{TOP}" '
                   f'width="{max(end - x(window.start), 2)}" height="{bottom - TOP}">'
                   f'<title>{escape(window.tip)}</title></rect>')
    for key in lanes:
        y = y_of[key]
        out.append(f'<g class="lane" data-lane="{escape(key)}">'
                   f'<text class="lane-label" x="{left - 8}" y="{y + 4}" text-anchor="end">'
                   f'{escape(_shorten(line.lanes[key]))}<title>{escape(line.lanes[key])}'
                   f'</title></text>'
                   f'<line class="lane-line" x1="{left}" x2="{right}" y1="{y}" y2="{y}"/></g>')
    for mark in sorted(line.marks, key=_layer):
        y = y_of[mark.lane]
        tip = f"<title>{escape(mark.tip)}</title>"
        if mark.end is not None:
            out.append(f'<rect class="mark {mark.kind}" x="{x(mark.at)}" y="{y - 7}" '
                       f'width="{max(x(mark.end) - x(mark.at), 3)}" height="14">{tip}</rect>')
        elif mark.kind == "access":
            out.append(f'<line class="mark access" x1="{x(mark.at)}" x2="{x(mark.at)}" '
                       f'y1="{y - 9}" y2="{y + 9}">{tip}</line>')
        elif mark.kind == "violation":
            cx, s = x(mark.at), 7
            out.append(f'<path class="mark violation" d="M{cx - s},{y - s}L{cx + s},{y + s}'
                       f'M{cx - s},{y + s}L{cx + s},{y - s}">{tip}</path>')
        elif mark.kind == "transfer":
            cx = x(mark.at)
            out.append(f'<path class="mark transfer" d="M{cx},{y - 8}L{cx + 8},{y}L{cx},{y + 8}'
                       f'L{cx - 8},{y}Z">{tip}</path>')
        else:  # created, holder-mark
            out.append(f'<circle class="mark {mark.kind}" cx="{x(mark.at)}" cy="{y}" r="6">'
                       f'{tip}</circle>')
    out.append(f'<line class="axis" x1="{left}" x2="{right}" y1="{bottom + 4}" '
               f'y2="{bottom + 4}"/>')
    step = _ticks(span)
    tick = 0.0
    while tick <= span + step / 1000:
        tx = x(start + tick)
        out.append(f'<line class="axis-tick" x1="{tx}" x2="{tx}" y1="{bottom + 4}" '
                   f'y2="{bottom + 9}"/><text class="axis-label" x="{tx}" y="{bottom + 22}" '
                   f'text-anchor="middle">{escape(_duration(tick))}</text>')
        tick += step
    origin = datetime.datetime.fromtimestamp(start, datetime.timezone.utc)
    out.append(f'<text class="axis-origin" x="{left - 8}" y="{bottom + 22}" text-anchor="end">'
               f'{escape(origin.strftime("%H:%M:%S.%f")[:-3])} UTC</text>')
    out.append("</svg>")
    return "".join(out)


def _layer(mark: Mark) -> int:
    # Intervals under points, violations on top.
    return {"holder": 0, "access": 1, "created": 2, "transfer": 3, "holder-mark": 4,
            "violation": 5}.get(mark.kind, 3)


def _shorten(label: str, limit: int = 30) -> str:
    return label if len(label) <= limit else label[:limit - 1] + "…"
