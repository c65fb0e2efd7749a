"""Rendering the status page: one jinja2 environment, the page's sections, and the filters they use.

The page is a list of sections, each a partial template under ``templates/partials/``. The first paint
(``/``) and every live update (``/events``) render the sections with the same function, so a browser
without JavaScript sees exactly what a live page shows. Each section carries a short hash of its HTML;
the browser script swaps a section only when its hash changed, so the status region (``aria-live``) is
announced only when the status really changes.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from knotd.status.view import Page

# knotd/templates is a symlink to the top-level templates/ directory, so the wheel (and the .deb's venv)
# carries the same files the source tree has.
TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"
STATIC_DIR = TEMPLATE_DIR / "static"

# element ids in page order, each rendered from partials/<id>.html; the browser script swaps them by id
SECTIONS = ("status", "about", "sessions", "turns", "guardrails", "failures", "finished", "stages")


@dataclass(frozen=True)
class Section:
    html: Markup
    hash: str


def create_environment() -> jinja2.Environment:
    """The page's jinja2 environment: autoescaping everywhere, unknown names are errors, None prints as —."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        finalize=_no_none,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(latency=format_latency, duration=format_duration, clock=format_clock, iso=format_iso)
    return env


def _no_none(value: Any) -> Any:
    """A missing value reads as a dash, never as "None"."""
    return "—" if value is None else value


def render_sections(env: jinja2.Environment, page: Page) -> dict[str, Section]:
    """Every section of ``page``, rendered, by element id."""
    sections = {}
    for name in SECTIONS:
        html = env.get_template(f"partials/{name}.html").render(page=page)
        sections[name] = Section(Markup(html), hashlib.sha1(html.encode()).hexdigest()[:12])
    return sections


def render_index(env: jinja2.Environment, page: Page) -> str:
    """The whole page, as the first paint."""
    return env.get_template("index.html").render(page=page, sections=render_sections(env, page))


def live_update(env: jinja2.Environment, page: Page) -> dict[str, Any]:
    """The ``page`` event of ``/events``: the title, the server's clock and every section."""
    return {
        "title": page.title,
        "server_time": round(page.now, 3),
        "sections": {name: {"hash": s.hash, "html": str(s.html)} for name, s in render_sections(env, page).items()},
    }


# -- filters -----------------------------------------------------------------------------------------------
def format_latency(seconds: float | None) -> str:
    """420 ms, 1.24 s, 26.0 s; ``—`` when there is no value."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    if seconds < 0.001:
        return "<1 ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.2f} s"
    return f"{seconds:.1f} s"


def format_duration(seconds: float) -> str:
    """42 s, 4 min 12 s, 2 h 03 min, 3 d 4 h (``templates/static/status.js`` formats the same way)."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def format_clock(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def format_iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
