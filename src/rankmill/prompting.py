"""Rendering prompt templates into chat messages, and fencing untrusted text inside them.

Templates live in ``prompts/<name>.j2``. A template defines one Jinja2 block per chat role,
``{% block system %}`` and ``{% block user %}`` (and ``assistant`` for few-shot turns); each
block becomes one message, in the order the template defines them. Roles come from the template's
structure, never from rendered text, so nothing a document says can open a new message::

    messages = render_messages(load_prompt("label"), query=fence(q, "QUERY"), document=...)

Documents (and synthetic queries) are untrusted. :func:`fence` wraps a text between two marker
lines that carry a boundary derived from a hash of the text itself. A text cannot contain the
hash of itself, so it cannot forge its own closing marker; any marker-like line inside it is
neutralised anyway, so the model sees exactly one opening and one closing marker with that
boundary. Templates tell the model to treat everything between the markers as data.

This module is pure (Jinja2 and hashlib only).
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Any

import jinja2

ROLES = ("system", "user", "assistant")

_ENV = jinja2.Environment(
    undefined=jinja2.StrictUndefined,
    autoescape=False,  # chat prompts are plain text, not HTML
    keep_trailing_newline=False,
    trim_blocks=True,
    lstrip_blocks=True,
)


@dataclass(frozen=True)
class Fenced:
    """A text between forgery-proof markers; ``str()`` gives the fenced block."""

    label: str
    boundary: str
    body: str

    @property
    def begin(self) -> str:
        return f"<<<BEGIN {self.label} {self.boundary}>>>"

    @property
    def end(self) -> str:
        return f"<<<END {self.label} {self.boundary}>>>"

    def __str__(self) -> str:
        return f"{self.begin}\n{self.body}\n{self.end}"


# Anything that looks like one of our markers, whatever its boundary: a document may carry a
# marker copied from another prompt (or guessed), and the model should never see one inside.
_MARKER = re.compile(r"<<<\s*(BEGIN|END)\b[^>\n]*>>>", re.IGNORECASE)
_ANGLES = re.compile(r"(<{3,}|>{3,})")


def boundary_for(text: str, label: str, length: int = 16) -> str:
    """A boundary derived from the text: stable (same text, same prompt, same cache key) and
    unforgeable by the text (it would have to contain the hash of itself)."""
    digest = hashlib.sha256(f"rankmill-fence\x00{label}\x00{text}".encode()).hexdigest()
    return digest[:length]


def neutralise(text: str, boundary: str) -> str:
    """Remove every marker-like sequence and the boundary itself from untrusted text."""
    if "<<<" in text or ">>>" in text:  # both patterns need a run of three (most texts: none)
        text = _MARKER.sub("[marker removed]", text)
        # Runs of three or more angle brackets are what markers are made of; shorten them so
        # no partial marker survives either (e.g. one split across a line break).
        text = _ANGLES.sub(lambda m: m.group(0)[0] * 2, text)
    if boundary:
        text = text.replace(boundary, "[boundary removed]")
    return text


def fence(text: str, label: str = "DOCUMENT") -> Fenced:
    """Fence ``text`` for a prompt; ``label`` names what it is (DOCUMENT, QUERY, ...)."""
    label = re.sub(r"[^A-Z0-9_]", "_", label.upper()) or "TEXT"
    boundary = boundary_for(text, label)
    return Fenced(label=label, boundary=boundary, body=neutralise(text, boundary))


@functools.lru_cache(maxsize=64)
def _compiled(template_text: str) -> tuple[jinja2.Template, tuple[str, ...]]:
    """A template compiled once per text (compiling costs ~100x rendering), with its role
    blocks in order."""
    template = _ENV.from_string(template_text)
    names = [b for b in template.blocks if b in ROLES or re.fullmatch(r"(user|assistant)_\d+", b)]
    if not names:
        raise ValueError(
            "a prompt template must define at least one of the blocks "
            "{% block system %}, {% block user %}"
        )
    return template, tuple(names)


def render_messages(template_text: str, **variables: Any) -> list[dict[str, str]]:
    """Render a template's role blocks into chat messages (empty blocks are left out)."""
    template, names = _compiled(template_text)
    ctx = template.new_context(dict(variables))
    messages = []
    for name in names:
        content = "".join(template.blocks[name](ctx)).strip()
        if content:
            messages.append({"role": name.split("_", 1)[0], "content": content})
    return messages
